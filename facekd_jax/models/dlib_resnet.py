"""dlib's face-descriptor network (dlib_face_recognition_resnet_model_v1) in Flax, eval-only.

    variables = facekd_jax.teachers.dlib_format.load_dlib_variables(path)   # {"params": ...}, no batch_stats
    emb = DlibResNet29().apply(variables, images)   # images float [B, 150, 150, 3] -> float32 [B, 128]

images: NHWC RGB, normalised as (pixel - 127.5) / 127.5 like the rest of the project; the model undoes that and
applies dlib's own input scaling, (pixel - (122.782, 117.001, 104.298)) / 256. The output is dlib's 128-d
descriptor, not normalised; dlib calls two faces the same person below a Euclidean distance of 0.6.

ResNet-29, 5.61 M params, ~0.54 GFLOPs per image. dlib's batch norms are folded into per-channel affine layers
(scale, bias), so `train` is accepted and ignored. Shapes for 150x150 (dlib's layers, input outwards):
  stem   conv 7x7/2 valid (32) -> affine -> ReLU -> max-pool 3x3/2 valid    150 -> 72 -> 35
  block  conv 3x3 -> affine -> ReLU -> conv 3x3 -> affine, + shortcut, -> ReLU
         3 x 32 @35; down 64 @17 + 3 x 64; down 128 @8 + 2 x 128; down 256 @4 + 2 x 256; down 256 @2
  down   first conv stride 2 with no padding, shortcut = 2x2/2 average pool of the block input; the branches are
         added as if the smaller were zero-padded at the end (channels; at 8 -> 3 vs 4 and 4 -> 1 vs 2, the conv
         branch also lacks the last row and column)
  head   global average pool -> fc 256 -> 128, no bias
Params: stem/{conv,affine}, block{0..13}/{conv1,affine1,conv2,affine2}, fc/kernel; conv kernel [kh, kw, in, out]
+ bias, affine scale/bias [C]. float32 params, compute in `dtype`, float32 output.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# dlib's input layer (input_rgb_image_sized<150>): per-channel means (R, G, B) subtracted from 0..255 pixels,
# which are then divided by 256 (as stored in the weight file; to_flax_variables checks they agree).
DLIB_MEANS = (122.782, 117.001, 104.298)
DLIB_INPUT_SCALE = 256.0
STEM = dict(features=32, kernel=7, stride=2)
STEM_POOL = dict(window=3, stride=2)
DOWN_POOL = dict(window=2, stride=2)
# (features, stride) of the 14 residual blocks from the input outwards: dlib's alevel4 .. alevel0.
BLOCKS: Tuple[Tuple[int, int], ...] = (((32, 1),) * 3 + ((64, 2),) + ((64, 1),) * 3 + ((128, 2),) + ((128, 1),) * 2
                                       + ((256, 2),) + ((256, 1),) * 2 + ((256, 2),))


def conv_padding(kernel: int, stride: int) -> int:
    """dlib's default conv padding: half the kernel for stride 1, none for larger strides (as the file states)."""
    return kernel // 2 if stride == 1 else 0


class Affine(nn.Module):
    """Per-channel y = x * scale + bias (dlib's affine_ layer: a batch norm folded for inference)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _add_zero_padded(a, b):
    """a + b for NHWC maps of different H, W or C: the smaller is zero-padded at the end (dlib's add_prev)."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))

    def pad(x):
        return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)]) if x.shape != shape else x

    return pad(a) + pad(b)


class DlibStem(nn.Module):
    """[B, S, S, 3] -> [B, S', S', 32]: conv 7x7/2 (no padding) -> affine -> ReLU -> max-pool 3x3/2 (no padding)."""
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        k, s = STEM["kernel"], STEM["stride"]
        x = nn.Conv(STEM["features"], (k, k), strides=(s, s), padding=((0, 0), (0, 0)), dtype=self.dtype,
                    param_dtype=jnp.float32, precision=self.precision, name="conv")(x)
        x = nn.relu(Affine(self.dtype, name="affine")(x))
        w, ps = STEM_POOL["window"], STEM_POOL["stride"]
        # Like dlib's pooling with padding 0: windows that do not fit are dropped (72 -> 35, row 71 unused).
        return nn.max_pool(x, (w, w), strides=(ps, ps), padding="VALID")


class DlibBlock(nn.Module):
    """[B, H, W, C] -> [B, H', W', features]; stride 2 makes it a down block (avg-pooled, zero-padded shortcut)."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        def conv(y, stride, name):
            p = conv_padding(3, stride)
            return nn.Conv(self.features, (3, 3), strides=(stride, stride), padding=((p, p), (p, p)),
                           dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name=name)(y)

        y = nn.relu(Affine(self.dtype, name="affine1")(conv(x, self.stride, "conv1")))
        y = Affine(self.dtype, name="affine2")(conv(y, 1, "conv2"))
        shortcut = x
        if self.stride != 1:
            w, s = DOWN_POOL["window"], DOWN_POOL["stride"]
            shortcut = nn.avg_pool(x, (w, w), strides=(s, s), padding="VALID")
        return nn.relu(_add_zero_padded(y, shortcut))


class DlibResNet29(nn.Module):
    """dlib's ResNet-29 face descriptor: float [B, S, S, 3] ((pixel - 127.5) / 127.5) -> float32 [B, 128].

    precision: of the convolutions and the fc layer; HIGHEST by default so that accelerators (TF32 / bf16 passes)
    reproduce dlib's float32 descriptors (dlib's own threshold is 0.6, so 1e-3 errors matter for parity tests).
    """
    embedding_size: int = 128
    image_size: int = 150
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images, train: bool = False):
        del train   # eval-only: dlib's batch norms are folded into the affine layers
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise ValueError(f"DlibResNet29: expected images of shape [B, {s}, {s}, 3] (NHWC RGB, (pixel - 127.5) "
                             f"/ 127.5), got {tuple(images.shape)}")
        # Back to 0..255 pixels, then dlib's scaling; in float32 whatever the compute dtype.
        pixels = images.astype(jnp.float32) * 127.5 + 127.5
        x = ((pixels - jnp.asarray(DLIB_MEANS, jnp.float32)) / DLIB_INPUT_SCALE).astype(self.dtype)

        x = DlibStem(self.dtype, self.precision, name="stem")(x)
        for i, (features, stride) in enumerate(BLOCKS):
            x = DlibBlock(features, stride, self.dtype, self.precision, name=f"block{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.embedding_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                     precision=self.precision, name="fc")(x)
        return x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One dlib layer as DlibResNet29 expects it in the weight file, from the input outwards.

    kind: a record kind ('con', 'affine', 'relu', 'max_pool', 'avg_pool', 'add_prev', 'fc') or 'tag' / 'skip'
    (layers with no record); path: where its params go in DlibResNet29 ('' for none); fields: record fields that
    must equal these; in_channels: a con's input channels, an affine's channels.
    """
    kind: str
    path: str = ""
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)
    in_channels: int = 0


def dlib_layer_plan(embedding_size: int = 128) -> List[PlanStep]:
    """DlibResNet29's layers in dlib's terms, input outwards: what to_flax_variables checks the file against."""

    def con(path, features, kernel, stride, cin):
        p = 0 if path == "stem/conv" else conv_padding(kernel, stride)
        return PlanStep("con", path, dict(num_filters=features, nr=kernel, nc=kernel, stride_y=stride,
                                          stride_x=stride, padding_y=p, padding_x=p), cin)

    def pool(kind, window, stride):
        return PlanStep(kind, "", dict(nr=window, nc=window, stride_y=stride, stride_x=stride, padding_y=0,
                                       padding_x=0))

    plan = [con("stem/conv", STEM["features"], STEM["kernel"], STEM["stride"], 3),
            PlanStep("affine", "stem/affine", in_channels=STEM["features"]), PlanStep("relu"),
            pool("max_pool", STEM_POOL["window"], STEM_POOL["stride"])]
    cin = STEM["features"]
    for i, (features, stride) in enumerate(BLOCKS):
        plan += [PlanStep("tag"),   # tag1: the block input, the shortcut's source
                 con(f"block{i}/conv1", features, 3, stride, cin),
                 PlanStep("affine", f"block{i}/affine1", in_channels=features), PlanStep("relu"),
                 con(f"block{i}/conv2", features, 3, 1, features),
                 PlanStep("affine", f"block{i}/affine2", in_channels=features)]
        if stride != 1:   # tag2 marks the conv branch, skip1 goes back to the block input to pool it
            plan += [PlanStep("tag"), PlanStep("skip"), pool("avg_pool", DOWN_POOL["window"], DOWN_POOL["stride"])]
        plan += [PlanStep("add_prev"), PlanStep("relu")]
        cin = features
    plan += [pool("avg_pool", 0, 1),   # a window of 0: the whole map (global average pool)
             PlanStep("fc", "fc", dict(num_outputs=embedding_size, num_inputs=cin, has_bias=False))]
    return plan
