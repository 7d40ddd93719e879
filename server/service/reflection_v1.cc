#include "server/service/reflection_v1.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include <set>

namespace metaload::service {
namespace {

namespace v1 = grpc::reflection::v1;
using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

// Appends `file` and, first, every file it imports that this stream has not been sent yet.
void AddFile(const FileDescriptor* file, std::set<std::string>* sent,
             v1::FileDescriptorResponse* out) {
  if (!sent->insert(file->name()).second) return;
  for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), sent, out);
  google::protobuf::FileDescriptorProto proto;
  file->CopyTo(&proto);
  proto.SerializeToString(out->add_file_descriptor_proto());
}

void NotFound(const std::string& what, v1::ServerReflectionResponse* response) {
  response->mutable_error_response()->set_error_code(static_cast<int>(grpc::StatusCode::NOT_FOUND));
  response->mutable_error_response()->set_error_message(what + " not found");
}

}  // namespace

grpc::Status ReflectionV1::ServerReflectionInfo(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::ServerReflectionResponse, v1::ServerReflectionRequest>* stream) {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  std::set<std::string> sent;  // files this stream has been sent
  v1::ServerReflectionRequest request;
  while (!context->IsCancelled() && stream->Read(&request)) {
    v1::ServerReflectionResponse response;
    response.set_valid_host(request.host());
    *response.mutable_original_request() = request;
    const FileDescriptor* file = nullptr;
    switch (request.message_request_case()) {
      case v1::ServerReflectionRequest::kListServices:
        for (const std::string& name : services_) {
          response.mutable_list_services_response()->add_service()->set_name(name);
        }
        break;
      case v1::ServerReflectionRequest::kFileByFilename:
        file = pool->FindFileByName(request.file_by_filename());
        if (file == nullptr) NotFound("file '" + request.file_by_filename() + "'", &response);
        break;
      case v1::ServerReflectionRequest::kFileContainingSymbol:
        file = pool->FindFileContainingSymbol(request.file_containing_symbol());
        if (file == nullptr) {
          NotFound("symbol '" + request.file_containing_symbol() + "'", &response);
        }
        break;
      case v1::ServerReflectionRequest::kFileContainingExtension: {
        const v1::ExtensionRequest& e = request.file_containing_extension();
        const auto* type = pool->FindMessageTypeByName(e.containing_type());
        const auto* extension =
            type != nullptr ? pool->FindExtensionByNumber(type, e.extension_number()) : nullptr;
        if (extension != nullptr) {
          file = extension->file();
        } else {
          NotFound("extension " + std::to_string(e.extension_number()) + " of '" +
                       e.containing_type() + "'",
                   &response);
        }
        break;
      }
      case v1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
        const auto* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
        if (type == nullptr) {
          NotFound("type '" + request.all_extension_numbers_of_type() + "'", &response);
          break;
        }
        std::vector<const google::protobuf::FieldDescriptor*> extensions;
        pool->FindAllExtensions(type, &extensions);
        auto* numbers = response.mutable_all_extension_numbers_response();
        numbers->set_base_type_name(type->full_name());
        for (const auto* f : extensions) numbers->add_extension_number(f->number());
        break;
      }
      default:
        response.mutable_error_response()->set_error_code(
            static_cast<int>(grpc::StatusCode::UNIMPLEMENTED));
        response.mutable_error_response()->set_error_message("no request in the message");
        break;
    }
    if (file != nullptr) {
      // A file asked for again is sent again (the client asked), its imports only once.
      sent.erase(file->name());
      AddFile(file, &sent, response.mutable_file_descriptor_response());
    }
    if (!stream->Write(response)) break;
  }
  return grpc::Status::OK;
}

}  // namespace metaload::service
