import pytest

from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> str:
    return build_tiny_model("llama3.2", str(tmp_path_factory.mktemp("llama3.2")))
