"""The server takes speculative decoding in its engine arguments and reports acceptance on /metrics."""

import openai

from slimserve import LLM, SamplingParams
from tests.serve.metrics_text import scrape
from tests.serve.server import MODEL_NAME, ServerThread


def test_server_speculates_and_reports_acceptance(draft_folder):
    target_folder = draft_folder  # a word-level tokenizer: the text prompt maps to tokens
    spec = {"method": "draft", "model": target_folder, "num_speculative_tokens": 3}
    prompt = "w5 w6 w7 w8 w5 w6 w7"
    offline = LLM(target_folder, dtype="float32", device="cpu")
    want = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    with ServerThread(target_folder, speculative_config=spec) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(
            model=MODEL_NAME, prompt=prompt, temperature=0.0, max_tokens=10, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == want[0].outputs[0].text
        server.wait_idle()
        metrics = scrape(server.url)
    assert metrics["slimserve_spec_decode_num_draft_tokens_total"] > 0
    assert metrics["slimserve_spec_decode_acceptance_rate"] == 1.0  # the draft is the target itself
    assert metrics["slimserve_spec_decode_mean_accepted_length"] > 1
