"""One framework's side of benchmarks/benchmark.py, in its own process.

Keras fixes its backend at import, and a process's peak memory is only its
own, so each framework runs here, driven by the benchmark over stdin/stdout:

  KERAS_BACKEND=jax python -m benchmarks.benchmark_worker --framework keras_jax --backbone resnet50 \
      --image_size 224 --weights W.h5

Each stdin line is a JSON command; each answer is one JSON line on stdout
(everything else the libraries print goes to stderr):

  {"op": "setup", "mode": "inference"|"train"|"head", "batch_size": B}
      builds the step; times its first call (compilation included) -> {"first_call_s"}
  {"op": "step"}      one step, outputs ready before the clock stops -> {"seconds"}
  {"op": "peak"}      peak resident memory since the last setup -> {"peak_rss_bytes"}
  {"op": "ceilings"}  GFLOP/s of a large matmul and a 3x3 convolution -> {"matmul", "conv"}
  {"op": "flops", "batch_size": B}  (covid_jax only) XLA's FLOP count of the forward pass

Every timed step starts from the host batch (NumPy), as Keras's predict_on_batch
and train_on_batch do: covid_jax's step includes putting it on the devices.

With --export_weights the process only writes seeded Keras backbone weights to
--weights (legacy .h5, as keras.applications downloads) and exits: every
framework then loads the same weights.
"""

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Callable

from covid_jax import runtime

FRAMEWORKS = ('covid_jax', 'keras_tensorflow', 'keras_tensorflow_xla', 'keras_jax')
KERAS_BACKEND = {'keras_tensorflow': 'tensorflow', 'keras_tensorflow_xla': 'tensorflow', 'keras_jax': 'jax'}
# The study's head and optimiser, as configs/default.py has them.
HEAD_DIMS, DROPOUT, L1, L2, LABEL_SMOOTHING, LEARNING_RATE = (512, 256), 0.2, 1e-5, 1e-4, 0.2, 1e-4
# Ceiling probes: a square matmul and a ResNet-sized 3x3 convolution.
MATMUL_N, CONV_SHAPE, CONV_FEATURES = 2048, (8, 56, 56, 256), 256
SEED = 0


def images_and_labels(batch_size: int, image_size: int):
  """The same seeded RGB 0-255 batch and labels in every framework."""
  import numpy as np
  rng = np.random.default_rng(SEED)
  images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
  return images, rng.integers(0, 2, batch_size).astype(np.int32)


def reset_peak_memory() -> None:
  """Resets the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


class CovidJax:
  """The training system's own steps (steps.compile_steps): what a covid_jax run executes."""

  def __init__(self, backbone: str, image_size: int, weights: str, dtype: str, retain_freed_host_memory: bool):
    import jax
    from configs import default
    from covid_jax import input_pipeline, model_init, port, state, steps
    self.jax, self.make_phases, self.make_state = jax, state.make_phases, state.make_state
    self.compile_steps, self.axis = steps.compile_steps, steps.AXIS
    config = default.get_config()
    if retain_freed_host_memory:  # As covid_jax.main does with its default config, before the backend starts.
      runtime.retain_freed_memory()
    config.model.name, config.model.image_size, config.dtype = backbone, image_size, dtype
    config.learning_rate = LEARNING_RATE
    self.config, self.mesh = config, input_pipeline.data_mesh()
    # The formulations of the mesh's platform, as train.Trainer chooses them.
    self.formulations = model_init.choose_formulations(config, self.mesh.devices.flat[0].platform)
    self.model = model_init.create_model(config, self.formulations)
    self.variables = model_init.initial_variables(self.model, config, backbone=port.from_h5(weights, backbone))
    self.run: Callable[[], Any] | None = None

  def _phase(self, mode: str):
    """'head' is the study's first phase (backbone frozen, in inference mode); otherwise a full fine-tune."""
    self.config.freeze_backbone = mode == 'head'
    return self.make_phases(self.config)[0]

  def _host_state(self, phase):
    # Layer order matters only to the fine-tune phase, which the benchmark does not run.
    return self.make_state(self.model, self.config, self.variables, phase, [], steps_per_epoch=1000)

  def _state(self, phase):
    state = self._host_state(phase)
    # A copy (may_alias=False): the train step donates its state, and the next cell starts from the same variables.
    replicated = self.jax.sharding.NamedSharding(self.mesh, self.jax.sharding.PartitionSpec())
    return self.jax.device_put(state, replicated, may_alias=False)

  def _batch_on_devices(self, host_batch):
    images, labels = host_batch
    sharding = self.jax.sharding.NamedSharding(self.mesh, self.jax.sharding.PartitionSpec(self.axis))
    return {'image': self.jax.device_put(images, sharding), 'label': self.jax.device_put(labels, sharding)}

  def setup(self, mode: str, batch_size: int) -> None:
    self.run = None
    gc.collect()
    phase = self._phase(mode)
    train_fn, eval_fn = self.compile_steps(self.mesh, phase, self.config, self.formulations.separate_update)
    state, host_batch = self._state(phase), images_and_labels(batch_size, self.config.model.image_size)
    if mode == 'inference':
      self.run = lambda: eval_fn(state, self._batch_on_devices(host_batch)).block_until_ready()
      return
    key = self.jax.random.key(SEED)
    holder = {'state': state}

    def step():
      holder['state'], metrics = train_fn(holder['state'], self._batch_on_devices(host_batch), key)
      self.jax.block_until_ready((holder['state'], metrics))
    self.run = step

  def flops(self, batch_size: int) -> float:
    """XLA's FLOP count of the forward pass (the eval step) on one batch.

    Counted on the program lowered for the host's CPU, before any backend compiles it: XLA:GPU
    gives no cost analysis of a lowered program, and its compiled one leaves out the convolutions
    it hands to cuDNN. The program is still the one traced for the run's devices: the model holds
    their formulations.
    """
    jax, P = self.jax, self.jax.sharding.PartitionSpec
    mesh = jax.make_mesh((1,), (self.axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices('cpu')[:1])
    phase = self._phase('inference')
    _, eval_fn = self.compile_steps(mesh, phase, self.config, self.formulations.separate_update)

    def abstract(tree, spec):
      sharding = jax.sharding.NamedSharding(mesh, spec)
      return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          jax.eval_shape(lambda: tree))
    state = self._host_state(phase)
    images, labels = images_and_labels(batch_size, self.config.model.image_size)
    batch = abstract({'image': images, 'label': labels}, P(self.axis))
    return float(eval_fn.trace(abstract(state, P()), batch).lower().cost_analysis()['flops'])

  def ceilings(self) -> dict[str, float]:
    return _jax_ceilings(self.config.dtype)


def _jax_ceilings(dtype: str) -> dict[str, float]:
  """XLA's GFLOP/s on a large matmul and a 3x3 convolution in `dtype`: what covid_jax and Keras-JAX can reach."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  a = jnp.ones((MATMUL_N, MATMUL_N), dtype)
  x = jnp.ones(CONV_SHAPE, dtype)
  k = jnp.ones((3, 3, CONV_SHAPE[-1], CONV_FEATURES), dtype)
  matmul = jax.jit(lambda a: a @ a)
  conv = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return {'matmul': _best_gflops(lambda: matmul(a).block_until_ready(), 2 * MATMUL_N**3),
          'conv': _best_gflops(lambda: conv(x, k).block_until_ready(), _conv_flops())}


def _conv_flops() -> float:
  n, h, w, c = CONV_SHAPE
  return 2.0 * n * h * w * c * CONV_FEATURES * 9


def _best_gflops(fn: Callable[[], Any], flops: float, repeats: int = 10) -> float:
  fn()  # Compile / warm up.
  return flops / min(timed(fn) for _ in range(repeats)) / 1e9


class KerasModel:
  """keras.applications backbone + the study's head, compiled the way a Keras user would (model.compile)."""

  def __init__(self, framework: str, backbone: str, image_size: int, weights: str, dtype: str):
    import keras
    from covid_jax import models
    from covid_jax.port.keras_models import keras_backbone
    self.keras, self.framework, self.image_size, self.dtype = keras, framework, image_size, dtype
    if dtype == 'bfloat16':
      keras.mixed_precision.set_dtype_policy('mixed_bfloat16')
    self.base = base = keras_backbone(backbone, (image_size, image_size, 3))
    base.load_weights(weights)
    mode = models.get_spec(backbone).preprocessing
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Lambda(lambda t: keras.applications.imagenet_utils.preprocess_input(t, mode=mode))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    x = keras.layers.BatchNormalization()(x)
    for i, width in enumerate(HEAD_DIMS):
      regularizer = keras.regularizers.L1L2(L1, L2) if i == 0 else None
      x = keras.layers.Dense(width, activation='relu', kernel_regularizer=regularizer)(x)
      x = keras.layers.BatchNormalization()(x)
      if i < len(HEAD_DIMS) - 1:
        x = keras.layers.Dropout(DROPOUT)(x)
    outputs = keras.layers.Dense(2, dtype='float32')(x)
    self.model = keras.Model(inputs, outputs)
    self.run: Callable[[], Any] | None = None

  def setup(self, mode: str, batch_size: int) -> None:
    self.run = None
    gc.collect()
    keras = self.keras
    self.base.trainable = mode != 'head'  # Frozen: no gradients, and BN in inference mode.
    # Keras's default jit_compile='auto' means XLA on both backends; keras_tensorflow asks for TF's own kernels.
    self.model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                       loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=LABEL_SMOOTHING),
                       jit_compile=self.framework != 'keras_tensorflow')
    images, labels = images_and_labels(batch_size, self.image_size)
    if mode == 'inference':
      self.run = lambda: self.model.predict_on_batch(images)
    else:
      one_hot = keras.utils.to_categorical(labels, 2)
      self.run = lambda: self.model.train_on_batch(images, one_hot)

  def ceilings(self) -> dict[str, float]:
    if self.framework == 'keras_jax':  # The same XLA as covid_jax.
      return _jax_ceilings(self.dtype)
    import tensorflow as tf
    jit = self.framework == 'keras_tensorflow_xla'
    a = tf.ones((MATMUL_N, MATMUL_N), self.dtype)
    x, k = tf.ones(CONV_SHAPE, self.dtype), tf.ones((3, 3, CONV_SHAPE[-1], CONV_FEATURES), self.dtype)
    matmul = tf.function(lambda a: tf.linalg.matmul(a, a), jit_compile=jit)
    conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, 'SAME'), jit_compile=jit)
    return {'matmul': _best_gflops(lambda: matmul(a).numpy(), 2 * MATMUL_N**3),
            'conv': _best_gflops(lambda: conv(x, k).numpy(), _conv_flops())}


def export_weights(backbone: str, image_size: int, path: str) -> None:
  """Seeded random Keras backbone weights (ImageNet weights are not needed to time a step)."""
  from covid_jax.port.keras_models import keras_backbone, save_legacy_h5
  save_legacy_h5(keras_backbone(backbone, (image_size, image_size, 3), seed=SEED), path)


def serve(runner: Any, reply: Any) -> None:
  """Answers commands from stdin until it closes."""
  for line in sys.stdin:
    command = json.loads(line)
    op = command['op']
    if op == 'setup':
      reset_peak_memory()
      runner.setup(command['mode'], command['batch_size'])
      answer = {'first_call_s': timed(runner.run)}
      runner.run()  # One warm-up step after compilation.
    elif op == 'step':
      answer = {'seconds': timed(runner.run)}
    elif op == 'peak':
      answer = {'peak_rss_bytes': runtime.peak_resident_bytes()}
    elif op == 'ceilings':
      answer = runner.ceilings()
    elif op == 'flops':
      answer = {'flops': runner.flops(command['batch_size'])}
    else:
      answer = {'error': f'unknown op {op!r}'}
    reply.write(json.dumps(answer) + '\n')
    reply.flush()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--framework', choices=FRAMEWORKS, required=True)
  parser.add_argument('--backbone', required=True)
  parser.add_argument('--image_size', type=int, required=True)
  parser.add_argument('--weights', required=True, help='legacy Keras .h5 backbone weights')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--export_weights', action='store_true', help='write seeded weights to --weights and exit')
  parser.add_argument('--retain_freed_host_memory', choices=('true', 'false'), default='true',
                      help="covid_jax only: its config's retain_freed_host_memory (covid_jax.main's default: true)")
  args = parser.parse_args()
  # Answers go to the real stdout; anything the libraries print goes to stderr.
  reply = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)
  if args.export_weights:
    export_weights(args.backbone, args.image_size, args.weights)
    return
  if args.framework == 'covid_jax':
    runner = CovidJax(args.backbone, args.image_size, args.weights, args.dtype,
                      retain_freed_host_memory=args.retain_freed_host_memory == 'true')
  else:
    runner = KerasModel(args.framework, args.backbone, args.image_size, args.weights, args.dtype)
  reply.write(json.dumps({'ready': True}) + '\n')
  reply.flush()
  serve(runner, reply)


if __name__ == '__main__':
  main()
