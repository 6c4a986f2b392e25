"""llmperf-shaped prompts: exact sizes for the counting tokenizer, reproducible by seed."""

from __future__ import annotations

import pytest

from di_router.bench import prompts
from di_router.bench.tokenizer import SimTokenizer, TokenizerError, load_tokenizer
from di_router.sim.tokenizer import prompt_token_count


def test_prompts_have_the_requested_size_and_llmperf_shape():
    specs = prompts.llmperf_requests(SimTokenizer(), 20, 300, 40, 50, 10, seed=7)
    for spec in specs:
        assert spec.prompt.startswith(
            f"Randomly stream lines from the following text with {spec.max_tokens} output "
            "tokens. Don't generate eos tokens:\n\n"
        )
        assert spec.input_tokens == prompt_token_count(spec.prompt)  # the simulator agrees
    sizes = [s.input_tokens for s in specs]
    assert len(set(sizes)) > 5 and 150 < sum(sizes) / len(sizes) < 450  # drawn around 300
    again = prompts.llmperf_requests(SimTokenizer(), 20, 300, 40, 50, 10, seed=7)
    assert again == specs
    assert prompts.llmperf_requests(SimTokenizer(), 20, 300, 40, 50, 10, seed=8) != specs


def test_fixed_size_and_floor():
    specs = prompts.llmperf_requests(SimTokenizer(), 5, 1024, 0, 100, 0, seed=1)
    assert {s.input_tokens for s in specs} == {1024}
    assert {s.max_tokens for s in specs} == {100}
    # shorter than the instruction itself: the instruction alone, as llmperf's floor
    tiny = prompts.llmperf_requests(SimTokenizer(), 1, 3, 0, 8, 0, seed=1)[0]
    assert tiny.prompt == prompts.instruction(8)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="neither a file"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_a_local_tokenizer_json_sizes_prompts(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"])
    tok.train_from_iterator([*prompts.sonnet_lines(), prompts.instruction(16)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(tmp_path / "tokenizer.json"))

    real = load_tokenizer(str(tmp_path))  # a model directory, as the tutorial passes
    assert real.count_prompt("Shall I compare thee?") == 1 + 5  # BOS + 4 words + "?"
    assert real.count_output("Shall I compare thee?") == 5
    specs = prompts.llmperf_requests(real, 10, 200, 0, 16, 0, seed=3)
    assert {s.input_tokens for s in specs} == {200}
    assert all(real.count_prompt(s.prompt) == 200 for s in specs)
    assert any(prompt_token_count(s.prompt) != 200 for s in specs)  # really another tokenizer

    # an installed package that ships a tokenizer.json (anywhere inside it) is found by name
    package = tmp_path / "site" / "shipped_tokenizer"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "tokenizer.json").rename(package / "data" / "tokenizer.json")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    shipped = load_tokenizer("shipped_tokenizer")
    assert shipped.name.endswith("data/tokenizer.json")
    assert shipped.count_prompt("Shall I compare thee?") == 6
