"""Python client for the metaload daemon (metaload.v1.ModelLoader).

    from metaload_client import Client, MetaloadError
    c = Client("127.0.0.1:50051")
    info = c.load("sd/v1-5", dtype="float16", on_progress=lambda e: print(e.phase, e.bytes_done))
    out = c.infer(info.model_id, {"input_ids": numpy_or_torch_tensor})

Tensors go in and come out as numpy arrays, or torch tensors when torch is installed and
`as_torch=True` (needed for bfloat16, which numpy lacks). Every RPC error is raised as one
exception type, MetaloadError, carrying the gRPC status code.
"""
import numpy as np
import grpc

from metaload.v1 import metaload_pb2 as pb
from metaload.v1 import metaload_pb2_grpc as pb_grpc

__all__ = ["Client", "MetaloadError"]

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
          "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NUMPY.items()}


class MetaloadError(Exception):
    """An RPC failed. `code` is a grpc.StatusCode (e.g. NOT_FOUND), `details` the server's message."""

    def __init__(self, code, details):
        super().__init__("%s: %s" % (code.name, details))
        self.code = code
        self.details = details


def _encode(name, value):
    t = pb.Tensor(name=name)
    try:
        import torch
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            if value.dtype == torch.bfloat16:
                t.datatype = "BF16"
                t.shape.extend(value.shape)
                t.raw_data = value.view(torch.int16).numpy().tobytes()
                return t
            value = value.numpy()
    except ImportError:
        pass
    array = np.ascontiguousarray(value)
    if array.dtype not in _FROM_NUMPY:
        raise TypeError("input %r: unsupported dtype %s" % (name, array.dtype))
    t.datatype = _FROM_NUMPY[array.dtype]
    t.shape.extend(array.shape)
    t.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def _decode(t, as_torch):
    shape = tuple(t.shape)
    if t.fp32_contents:
        array = np.asarray(t.fp32_contents, dtype=np.float32).reshape(shape)
    elif t.int64_contents:
        array = np.asarray(t.int64_contents, dtype=np.int64).reshape(shape)
    elif t.datatype == "BF16":
        bits = np.frombuffer(t.raw_data, dtype="<u2").astype(np.uint32) << 16
        if as_torch:
            import torch
            return torch.from_numpy(bits.view(np.float32).reshape(shape).copy()).to(torch.bfloat16)
        return bits.view(np.float32).reshape(shape)
    else:
        array = np.frombuffer(t.raw_data, dtype=np.dtype(_NUMPY[t.datatype]).newbyteorder("<")).reshape(shape)
    if as_torch:
        import torch
        return torch.from_numpy(array.copy())
    return array


class Client:
    """A connection to one metaloadd. Thread-safe (one gRPC channel)."""

    def __init__(self, address="127.0.0.1:50051", token=None, timeout=None, root_certificates=None,
                 certificate_chain=None, private_key=None):
        options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.ModelLoaderStub(self._channel)
        self._metadata = (("authorization", "Bearer " + token),) if token else ()
        self._timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise MetaloadError(e.code(), e.details()) from None

    def load(self, path, model_id="", architecture="", device="", dtype="", dtype_overrides=None,
             allow_missing_keys=False, zero_copy=False, replace=False, pin=False, on_progress=None,
             compute_dtype="", compute_dtype_overrides=None, prediction="", vae_path=""):
        """Loads `path` (relative to a model root); returns the LoadModelResponse. With
        `on_progress`, it is called with each LoadEvent (phase, bytes_done, bytes_total).
        `prediction` ("epsilon" or "v") overrides what a Stable Diffusion UNet is read to predict;
        the response's model.diffusion says what it predicts and how that was told. `vae_path`:
        a Stable Diffusion model's VAE from that file (relative to a model root)."""
        request = pb.LoadModelRequest(path=path, model_id=model_id, architecture=architecture,
                                      device=device, dtype=dtype, dtype_overrides=dtype_overrides or {},
                                      allow_missing_keys=allow_missing_keys, zero_copy=zero_copy,
                                      replace=replace, pin=pin, compute_dtype=compute_dtype,
                                      compute_dtype_overrides=compute_dtype_overrides or {},
                                      prediction=prediction, vae_path=vae_path)
        if on_progress is None:
            return self._call(self._stub.LoadModel, request)
        try:
            result = None
            for event in self._stub.LoadModelStream(request, timeout=self._timeout, metadata=self._metadata):
                on_progress(event)
                if event.HasField("result"):
                    result = event.result
            return result
        except grpc.RpcError as e:
            raise MetaloadError(e.code(), e.details()) from None

    def unload(self, model_id):
        return self._call(self._stub.UnloadModel, pb.UnloadModelRequest(model_id=model_id)).model

    def get(self, model_id):
        return self._call(self._stub.GetModel, pb.GetModelRequest(model_id=model_id))

    def list(self):
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def infer(self, model_id, inputs, entry="", as_torch=False):
        """Runs `entry` of `model_id` on `inputs` (name -> numpy array or torch tensor); returns
        name -> numpy array (or torch tensor with as_torch=True)."""
        request = pb.InferRequest(model_id=model_id, entry=entry,
                                  inputs=[_encode(k, v) for k, v in inputs.items()])
        response = self._call(self._stub.Infer, request)
        return {t.name: _decode(t, as_torch) for t in response.outputs}
