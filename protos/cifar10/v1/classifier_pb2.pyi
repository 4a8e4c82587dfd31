from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_CHW: _ClassVar[Layout]
    LAYOUT_HWC: _ClassVar[Layout]

class ResizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIZE_CENTER_CROP: _ClassVar[ResizeMode]
    RESIZE_REJECT: _ClassVar[ResizeMode]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
LAYOUT_CHW: Layout
LAYOUT_HWC: Layout
RESIZE_CENTER_CROP: ResizeMode
RESIZE_REJECT: ResizeMode

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawTensor
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawTensor, _Mapping]] = ...) -> None: ...

class RawTensor(_message.Message):
    __slots__ = ("shape", "dtype", "layout", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    layout: Layout
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "feature_layers", "feature_dtype", "resize", "request_id", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    feature_layers: _containers.RepeatedScalarFieldContainer[str]
    feature_dtype: DType
    resize: ResizeMode
    request_id: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., feature_layers: _Optional[_Iterable[str]] = ..., feature_dtype: _Optional[_Union[DType, str]] = ..., resize: _Optional[_Union[ResizeMode, str]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "results", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[Result]
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("probabilities", "top_k", "feature_maps")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top_k: _containers.RepeatedCompositeFieldContainer[Prediction]
    feature_maps: _containers.RepeatedCompositeFieldContainer[FeatureMap]
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., top_k: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., feature_maps: _Optional[_Iterable[_Union[FeatureMap, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class FeatureMap(_message.Message):
    __slots__ = ("layer", "shape", "dtype", "data")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layer: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, layer: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "versions")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "is_default", "class_names", "input", "pooling", "layers", "flops_per_image", "parameters", "validation_accuracy", "validation_images", "dataset", "device", "metadata_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    is_default: bool
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input: InputSpec
    pooling: Pooling
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    flops_per_image: int
    parameters: int
    validation_accuracy: float
    validation_images: int
    dataset: str
    device: str
    metadata_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., is_default: _Optional[bool] = ..., class_names: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., pooling: _Optional[_Union[Pooling, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., flops_per_image: _Optional[int] = ..., parameters: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., validation_images: _Optional[int] = ..., dataset: _Optional[str] = ..., device: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("shape", "dtype", "color")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    color: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., color: _Optional[str] = ...) -> None: ...

class Pooling(_message.Message):
    __slots__ = ("kind", "window", "stride", "padding")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    kind: str
    window: int
    stride: int
    padding: int
    def __init__(self, kind: _Optional[str] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., padding: _Optional[int] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "kind", "output_shape", "flops", "kernel", "stride")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    flops: int
    kernel: int
    stride: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., flops: _Optional[int] = ..., kernel: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "images", "class_index", "layer", "resize", "request_id", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    class_index: int
    layer: str
    resize: ResizeMode
    request_id: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., class_index: _Optional[int] = ..., layer: _Optional[str] = ..., resize: _Optional[_Union[ResizeMode, str]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "explanations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("class_index", "label", "probability", "maps")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    probability: float
    maps: _containers.RepeatedCompositeFieldContainer[ExplanationMap]
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., maps: _Optional[_Iterable[_Union[ExplanationMap, _Mapping]]] = ...) -> None: ...

class ExplanationMap(_message.Message):
    __slots__ = ("method", "layer", "shape", "values")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    method: str
    layer: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, method: _Optional[str] = ..., layer: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class GetFiltersRequest(_message.Message):
    __slots__ = ("model", "model_version", "layers", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    dtype: DType
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("model", "model_version", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerFilters]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerFilters, _Mapping]]] = ...) -> None: ...

class LayerFilters(_message.Message):
    __slots__ = ("layer", "kind", "weight", "bias")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    kind: str
    weight: WeightTensor
    bias: WeightTensor
    def __init__(self, layer: _Optional[str] = ..., kind: _Optional[str] = ..., weight: _Optional[_Union[WeightTensor, _Mapping]] = ..., bias: _Optional[_Union[WeightTensor, _Mapping]] = ...) -> None: ...

class WeightTensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...
