"""Test set-up: 8 simulated CPU devices (set before JAX initialises its backends)."""

import os
import tempfile

import pytest
from helpers import shakespeare_tokenizer

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the session and the processes its tests start (CLI runs,
# multi-process runs, the fault tests' restarts compile the same programs again and again).
if os.environ.get("GF_JAX_TEST_COMPILE_CACHE", "1") == "1":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gf_jax_test_jit_cache_"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _fake_gcs_class():
    """An fsspec file system serving gs://bucket/key from ``<root>/bucket/key`` on the local disk
    (``pipe_file(mode="create")`` is fsspec's default), for run directories "in a bucket"."""
    from fsspec.implementations.local import LocalFileSystem

    class FakeGCS(LocalFileSystem):
        root = None
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    return os.path.join(cls.root, path[len(prefix):])
            return super()._strip_protocol(path)

    return FakeGCS


@pytest.fixture
def bucket(tmp_path):
    """gs:// paths served from ``tmp_path/gcs`` for the duration of a test (yields that folder)."""
    import fsspec
    from etils.epath import backend

    fake = _fake_gcs_class()
    fake.root = str(tmp_path / "gcs")
    os.makedirs(fake.root)
    fsspec.register_implementation("gcs", fake, clobber=True)
    fsspec.register_implementation("gs", fake, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield tmp_path / "gcs"
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The Shakespeare tokenizer, once per test module (a module may define its own ``tok``)."""
    return shakespeare_tokenizer(tmp_path_factory)
