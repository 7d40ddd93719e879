#include "server/models/ldm_keys.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace metaload::models {

bool HasKeyPrefix(const core::CheckpointIndex& index, const std::string& prefix) {
  auto it = index.by_name.lower_bound(prefix);
  return it != index.by_name.end() && absl::StartsWith(it->first, prefix);
}

absl::Status NotLdmLayout(const LdmKeys& keys, const std::string& what) {
  return absl::FailedPreconditionError(absl::StrCat(
      keys.index.path, ": not an ", absl::AsciiStrToUpper(keys.family), " layout: ", what));
}

namespace {

// The largest size any LDM network's tensor has in one dimension is 49408 (the vocabularies).
constexpr int64_t kMaxLdmDim = int64_t{1} << 20;

// The shape of `key`, FAILED_PRECONDITION naming it when missing or of another rank.
absl::StatusOr<std::vector<int64_t>> Shape(const LdmKeys& keys, const std::string& key,
                                           size_t rank) {
  const core::CheckpointIndex& index = keys.index;
  const core::TensorInfo* t = index.Find(key);
  if (t == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": ", keys.family, " checkpoint lacks ", key));
  }
  if (t->shape.size() != rank) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": ", key, " has rank ", t->shape.size(), ", expected ", rank));
  }
  // Every size read here divides or multiplies others: a zero (safetensors allows it) would
  // divide by zero, a huge one overflow.
  for (int64_t d : t->shape) {
    if (d < 1 || d > kMaxLdmDim) {
      return absl::FailedPreconditionError(absl::StrCat(
          index.path, ": ", key, " has a dimension of ", d, " (1 to ", kMaxLdmDim, " fit)"));
    }
  }
  return t->shape;
}

// Levels of a UNet or VAE: SD's have 3 or 4; the downscale is 2^(levels - 1).
constexpr size_t kMaxLdmLevels = 8;

// How many numbered children `prefix` has, counting from 0 while `prefix` + "N." starts a key:
// a SpatialTransformer's transformer_blocks, a CLIP encoder's layers, a VAE level's blocks.
int64_t CountNumbered(const core::CheckpointIndex& index, const std::string& prefix) {
  int64_t n = 0;
  while (HasKeyPrefix(index, absl::StrCat(prefix, n, "."))) ++n;
  return n;
}

#define ML_ASSIGN_SHAPE(var, expr)              \
  auto var##_or = (expr);                       \
  if (!var##_or.ok()) return var##_or.status(); \
  const std::vector<int64_t>& var = *var##_or

}  // namespace

absl::StatusOr<UnetConfig> ReadUnet(const LdmKeys& keys, const std::string& p) {
  const core::CheckpointIndex& index = keys.index;
  UnetConfig c;
  ML_ASSIGN_SHAPE(conv_in, Shape(keys, p + "input_blocks.0.0.weight", 4));
  ML_ASSIGN_SHAPE(conv_out, Shape(keys, p + "out.2.weight", 4));
  c.model_channels = conv_in[0];
  c.in_channels = conv_in[1];
  c.out_channels = conv_out[0];
  if (c.model_channels % 32 != 0) return NotLdmLayout(keys, "UNet channels not a multiple of 32");
  // Walk input_blocks: res blocks (with attention or not), then a downsampler per level but the
  // last. The first level's count (at its downsampler, or at the end when it is the only level)
  // fixes the res blocks per level; every other level must have as many.
  std::optional<int64_t> res_blocks;
  int64_t in_level = 0;
  auto level_done = [&]() -> absl::Status {
    if (in_level == 0) return NotLdmLayout(keys, "a UNet level without res blocks");
    if (res_blocks && in_level != *res_blocks) {
      return NotLdmLayout(keys, "UNet levels with different numbers of res blocks");
    }
    res_blocks = in_level;
    in_level = 0;
    return absl::OkStatus();
  };
  for (int64_t i = 1; HasKeyPrefix(index, absl::StrCat(p, "input_blocks.", i, ".")); ++i) {
    const std::string b = absl::StrCat(p, "input_blocks.", i, ".");
    if (index.Find(b + "0.op.weight") != nullptr) {
      if (absl::Status s = level_done(); !s.ok()) return s;
      continue;
    }
    ML_ASSIGN_SHAPE(out, Shape(keys, b + "0.out_layers.3.weight", 4));
    const bool attention = index.Find(b + "1.proj_in.weight") != nullptr;
    if (in_level == 0) {
      if (out[0] % c.model_channels != 0) return NotLdmLayout(keys, "UNet width not a multiple");
      if (c.mult.size() == kMaxLdmLevels) return NotLdmLayout(keys, "more UNet levels than fit");
      c.mult.push_back(out[0] / c.model_channels);
      c.attention.push_back(attention);
      c.depth.push_back(CountNumbered(index, b + "1.transformer_blocks."));
    } else if (attention != c.attention.back()) {
      return NotLdmLayout(keys, "UNet attention differs within a level");
    }
    ++in_level;
  }
  if (c.mult.empty()) return NotLdmLayout(keys, "no UNet input blocks");
  if (absl::Status s = level_done(); !s.ok()) return s;  // the last level
  c.res_blocks = *res_blocks;
  // The middle block always has a SpatialTransformer: its proj_in's rank tells convolution (4)
  // from Linear (2). Heads are the assembler's to state: no shape tells them.
  const core::TensorInfo* proj_in = index.Find(p + "middle_block.1.proj_in.weight");
  if (proj_in == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": ", keys.family, " checkpoint lacks ", p, "middle_block.1.proj_in.weight"));
  }
  if (proj_in->shape.size() != 2 && proj_in->shape.size() != 4) {
    return NotLdmLayout(keys, "UNet proj_in.weight neither a Linear nor a 1x1 convolution");
  }
  c.linear_proj = proj_in->shape.size() == 2;
  c.middle_depth = CountNumbered(index, p + "middle_block.1.transformer_blocks.");
  if (HasKeyPrefix(index, p + "label_emb.")) {
    ML_ASSIGN_SHAPE(label, Shape(keys, p + "label_emb.0.0.weight", 2));
    c.adm_in_channels = label[1];
  }
  ML_ASSIGN_SHAPE(to_k,
                  Shape(keys, p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2));
  c.context_dim = to_k[1];
  return c;
}

absl::StatusOr<VaeConfig> ReadVae(const LdmKeys& keys, const std::string& p) {
  const core::CheckpointIndex& index = keys.index;
  VaeConfig c;
  ML_ASSIGN_SHAPE(conv_in, Shape(keys, p + "encoder.conv_in.weight", 4));
  ML_ASSIGN_SHAPE(dec_in, Shape(keys, p + "decoder.conv_in.weight", 4));
  ML_ASSIGN_SHAPE(dec_out, Shape(keys, p + "decoder.conv_out.weight", 4));
  ML_ASSIGN_SHAPE(post_quant, Shape(keys, p + "post_quant_conv.weight", 4));
  c.ch = conv_in[0];
  c.in_channels = conv_in[1];
  c.z_channels = dec_in[1];
  c.out_channels = dec_out[0];
  c.embed_dim = post_quant[1];
  for (size_t level = 0;
       index.Find(absl::StrCat(p, "encoder.down.", level, ".block.0.conv1.weight")) != nullptr;
       ++level) {
    ML_ASSIGN_SHAPE(
        out, Shape(keys, absl::StrCat(p, "encoder.down.", level, ".block.0.conv2.weight"), 4));
    if (out[0] % c.ch != 0) return NotLdmLayout(keys, "VAE width not a multiple of its base");
    if (c.mult.size() == kMaxLdmLevels) return NotLdmLayout(keys, "more VAE levels than fit");
    c.mult.push_back(out[0] / c.ch);
  }
  if (c.mult.empty()) return NotLdmLayout(keys, "no VAE encoder levels");
  c.res_blocks = CountNumbered(index, p + "encoder.down.0.block.");
  return c;
}

absl::StatusOr<ClipConfig> ReadClip(const LdmKeys& keys, const std::string& p) {
  const core::CheckpointIndex& index = keys.index;
  ClipConfig c;
  ML_ASSIGN_SHAPE(tokens, Shape(keys, p + "embeddings.token_embedding.weight", 2));
  ML_ASSIGN_SHAPE(positions, Shape(keys, p + "embeddings.position_embedding.weight", 2));
  ML_ASSIGN_SHAPE(fc1, Shape(keys, p + "encoder.layers.0.mlp.fc1.weight", 2));
  c.vocab = tokens[0];
  c.width = tokens[1];
  c.positions = positions[0];
  c.ffn = fc1[0];
  c.heads = std::max<int64_t>(1, c.width / 64);  // ViT-L/14: 768 wide, 12 heads of 64
  if (c.width % c.heads != 0) return NotLdmLayout(keys, "CLIP width not a multiple of 64");
  c.layers = CountNumbered(index, p + "encoder.layers.");
  return c;
}

absl::StatusOr<OpenClipConfig> ReadOpenClip(const LdmKeys& keys, const std::string& p) {
  const core::CheckpointIndex& index = keys.index;
  OpenClipConfig c;
  ML_ASSIGN_SHAPE(tokens, Shape(keys, p + "token_embedding.weight", 2));
  ML_ASSIGN_SHAPE(positions, Shape(keys, p + "positional_embedding", 2));
  ML_ASSIGN_SHAPE(fc, Shape(keys, p + "transformer.resblocks.0.mlp.c_fc.weight", 2));
  c.vocab = tokens[0];
  c.width = tokens[1];
  c.positions = positions[0];
  c.ffn = fc[0];
  if (positions[1] != c.width) return NotLdmLayout(keys, "OpenCLIP embeddings of two widths");
  c.heads = std::max<int64_t>(1, c.width / 64);  // open_clip's head width
  if (c.width % c.heads != 0) return NotLdmLayout(keys, "OpenCLIP width not a multiple of 64");
  c.layers = CountNumbered(index, p + "transformer.resblocks.");
  const int64_t full_depth = c.width == 1024 ? 24 : c.width == 1280 ? 32 : c.layers;
  if (c.layers + 1 == full_depth) {
    c.output_layer = c.layers;  // the last resblock left out: what is here is the penultimate
  } else if (c.layers >= 2) {
    c.output_layer = c.layers - 1;
  } else {
    return NotLdmLayout(keys, "an OpenCLIP text encoder needs two resblocks for its penultimate");
  }
  if (index.Find(p + "text_projection") != nullptr) {
    ML_ASSIGN_SHAPE(proj, Shape(keys, p + "text_projection", 2));
    if (proj[0] != c.width) return NotLdmLayout(keys, "OpenCLIP text_projection is not [width, N]");
    c.projection = proj[1];
  }
  if (const core::TensorInfo* scale = index.Find(p + "logit_scale"); scale != nullptr) {
    if (!scale->shape.empty()) return NotLdmLayout(keys, "OpenCLIP logit_scale is not a scalar");
    c.logit_scale = true;
  }
  return c;
}

#undef ML_ASSIGN_SHAPE

}  // namespace metaload::models
