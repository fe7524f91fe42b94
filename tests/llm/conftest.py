from tests.fedlearn.conftest import coordinator, make_manifest

__all__ = ["coordinator", "make_manifest"]
