"""t5tpu: fine-tune T5 checkpoints in JAX, t5x-compatible, from a laptop CPU to a TPU pod."""
import os as _os

# orbax reaches gs:// through etils.epath; use gcsfs there (the client t5tpu's own I/O and
# tests use) rather than TensorFlow's filesystem. Must be set before etils is imported.
_os.environ.setdefault('EPATH_USE_TF', 'false')
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# gcsfs: skip a probe for hierarchical-namespace buckets that costs 60 s per bucket offline.
_os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

__version__ = '0.1.0'
