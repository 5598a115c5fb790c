"""onnx-tensorrt's operator support matrix, as data, for engine_build/trt/rules.py.

Source: onnx/onnx-tensorrt docs/operators.md, "TensorRT 10.15 supports operators in the inclusive range
of opset 9 to opset 24" — the newest matrix published (the Dockerfile pins TensorRT 11.4; no 11.x matrix
is public yet, and 11.x only added operators). Our own table, not a copy: per operator, the types its
main (first) input may have — `Supported Types` — and the operators marked `N` (importing one needs a
TensorRT plugin). Restrictions that matter for tile graphs are checked in trt_rules.py.

When the pinned TensorRT moves, compare this table with that release's operators.md.
"""

from __future__ import annotations

#: The TensorRT release whose onnx-tensorrt matrix this table follows.
MATRIX_VERSION = "10.15"
#: Opsets the parser imports (default ONNX domain).
OPSET_MIN, OPSET_MAX = 9, 24

# Type tokens as operators.md writes them.
_F = frozenset({"FP32", "FP16", "BF16"})
_FP = frozenset({"FP32", "FP16"})  # no bf16
_I = frozenset({"INT32", "INT64"})
_FI = _F | _I
_FIB = _FI | {"BOOL"}
_B = frozenset({"BOOL"})
_CAST = _FIB | {"UINT8"}
_CONST = _FIB | {"FP8", "FP4", "INT4"}

#: operator → the dtypes TensorRT accepts for its first input (its output for source ops like Constant).
SUPPORTED: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max "
        "Min Mod Mul Neg Pad Pow Range Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub "
        "Sum TopK ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
        "ReduceSum ReduceSumSquare".split(),
        _FI,
    ),
    **dict.fromkeys(
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose "
        "Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
        "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
        "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
        "MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike "
        "RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round "
        "ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu "
        "Upsample".split(),
        _F,
    ),
    **dict.fromkeys(
        "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
        "ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where".split(),
        _FIB,
    ),
    **dict.fromkeys(
        "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero "
        "RoiAlign".split(),
        _FP,
    ),
    **dict.fromkeys("And Not Or Xor".split(), _B),
    "Attention": _F | {"INT8", "FP8"},
    "Cast": _CAST,
    "CastLike": _CAST,
    "Constant": _CONST,
    "ConstantOfShape": _CONST,
    "DequantizeLinear": frozenset({"INT8", "FP8", "FP4", "INT4"}),
    "Gelu": _FI | {"INT8"},
    "Mean": _FI | {"FP8"},
    "STFT": frozenset({"FP32"}),
    "TensorScatter": _F | {"INT32"},
}

#: Operators onnx-tensorrt marks unsupported (`N`): a graph with one needs a TensorRT plugin.
UNSUPPORTED: frozenset[str] = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool "
    "MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement "
    "OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty "
    "SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence "
    "StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique".split()
)
