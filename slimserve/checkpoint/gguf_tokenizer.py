"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` pipeline and wrapped for transformers.

A GGUF stores the vocabulary, merges, token types and special-token ids, plus a name for the way text is
split before the merges run (`tokenizer.ggml.pre`); the splitting rules themselves are the model's own and
are restated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from slimserve.errors import CheckpointError

if TYPE_CHECKING:
    from slimserve.checkpoint.gguf_reader import GGUFCheckpoint

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# Llama 3 and Qwen2 split text alike (contractions, words, numbers, punctuation runs, newlines, other spaces)
# except for numbers: Llama 3 keeps up to three digits together, Qwen2 splits every digit.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCTUATION_AND_SPACES = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _WORDS + r"\p{N}{1,3}" + _PUNCTUATION_AND_SPACES
_QWEN2_SPLIT = _WORDS + r"\p{N}" + _PUNCTUATION_AND_SPACES
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Llama 3's vocabulary holds whole words that its merges would not rebuild; they are looked up first.
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}
# Qwen's tokenizer normalizes to NFC before splitting.
_NFC = {"qwen2", "deepseek-r1-qwen"}
_GPT2_STYLE = {"default", "gpt2", "gpt-2"}


def build_tokenizer(ckpt: GGUFCheckpoint) -> PreTrainedTokenizerFast:
    """The file's tokenizer with its special tokens, BOS/EOS behaviour and chat template."""
    tokens: list[str] | None = ckpt.metadata("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{ckpt.path}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    token_types: list[int] = ckpt.metadata("tokenizer.ggml.token_type") or []
    kind = ckpt.metadata("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level(ckpt, tokens)
    elif kind == "llama":
        # Some converters write pieces made only of spaces with real spaces; the normalizer turns spaces into '▁'.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        backend = _sentencepiece(ckpt, tokens, token_types)
    else:
        raise CheckpointError(f"{ckpt.path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    # Control tokens match the raw text. User-defined pieces match whole, and SentencePiece looks for them in the
    # normalized text, where spaces are already '▁'.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == CONTROL]
    backend.add_special_tokens(control)
    normalized = kind == "llama"
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=normalized) for t, k in zip(tokens, token_types) if k == USER_DEFINED]
    )

    def special(key: str) -> str | None:
        index = ckpt.metadata(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    # llama.cpp's defaults when the file does not say: SentencePiece vocabularies start with BOS.
    add_bos = bool(ckpt.metadata("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(ckpt.metadata("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        backend.post_processor = _template(bos if add_bos else None, eos if add_eos else None, backend)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=ckpt.metadata("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=ckpt.config["max_position_embeddings"],
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    # The first of duplicate spellings keeps its id, as in llama.cpp's lookup.
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _merges(ckpt: GGUFCheckpoint) -> list[tuple[str, str]] | None:
    merges = ckpt.metadata("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{ckpt.path}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level(ckpt: GGUFCheckpoint, tokens: list[str]) -> Tokenizer:
    """GPT-2-style byte-level BPE, split the way the named pre-tokenizer splits."""
    merges = _merges(ckpt)
    if merges is None:
        raise CheckpointError(f"{ckpt.path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    pre = ckpt.metadata("tokenizer.ggml.pre", "default")
    backend = Tokenizer(models.BPE(_vocab(tokens), merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre == "smollm":
        # SmolLM splits every digit on its own, then applies GPT-2's split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _SPLIT_PATTERNS:
        split = pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in _GPT2_STYLE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        known = ", ".join(sorted({"smollm", *_SPLIT_PATTERNS, *_GPT2_STYLE}))
        raise CheckpointError(f"{ckpt.path}: pre-tokenizer {pre!r} is not supported (supported: {known})")
    if pre in _NFC:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece(ckpt: GGUFCheckpoint, tokens: list[str], token_types: list[int]) -> Tokenizer:
    """SentencePiece BPE with byte fallback: spaces become '▁' and unknown characters their UTF-8 bytes."""
    vocab = _vocab(tokens)
    merges = _merges(ckpt) or _merges_from_vocab(tokens, token_types, vocab)
    unk_id = ckpt.metadata("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ckpt.metadata("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_vocab(tokens: list[str], token_types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary, whose pieces are listed in the order they were merged.

    Every split of a piece into two pieces of the vocabulary is a merge, ranked by the piece's position.
    """
    ranked = []
    for rank, token in enumerate(tokens):
        if len(token) < 2 or (token_types and token_types[rank] in (CONTROL, USER_DEFINED)):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((rank, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _template(bos: str | None, eos: str | None, backend: Tokenizer) -> processors.TemplateProcessing:
    def sequence(piece: str, type_id: int) -> str:
        return " ".join(
            [*([f"{bos}:{type_id}"] if bos else []), f"{piece}:{type_id}", *([f"{eos}:{type_id}"] if eos else [])]
        )

    specials = [(token, backend.token_to_id(token)) for token in {bos, eos} if token]
    return processors.TemplateProcessing(
        single=sequence("$A", 0), pair=f"{sequence('$A', 0)} {sequence('$B', 1)}", special_tokens=specials
    )
