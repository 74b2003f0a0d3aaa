"""t5tpu: fine-tune T5 checkpoints in JAX, t5x-compatible, from a laptop CPU to a TPU pod."""
from t5tpu import runtime_env as _runtime_env

_runtime_env.configure()  # before jax, etils or TensorFlow are imported

__version__ = '0.1.0'
