import os

import pytest

from slimserve import LLM
from tests.serve.server import ServerThread
from tests.tiny_models import build_tiny_model

# The tiny tokenizer knows only the words w0..w511 once reloaded (its <unk> shares id 0 with w0 and is
# lost on saving), so the chat template names roles with words it knows.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5 {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    folder = build_tiny_model("llama3.2", str(tmp_path_factory.mktemp("serve-llama3.2")))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="session")
def server(tiny_folder):
    with ServerThread(tiny_folder, block_size=4, num_kv_blocks=512) as s:
        yield s


@pytest.fixture(scope="session")
def offline(tiny_folder) -> LLM:
    """The offline API on the same model: what the server must reproduce."""
    return LLM(tiny_folder, dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
