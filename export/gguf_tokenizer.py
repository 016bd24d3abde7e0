"""The tokenizer of a Hugging Face directory as GGUF metadata for llama.cpp (byte-level BPE only, yet).

What llama.cpp's converter (ggml-org/llama.cpp, convert_hf_to_gguf.py) does, for ``tokenizer.json``
files of the ``BPE`` model type without byte fallback: ``get_vocab_base`` / ``_set_vocab_gpt2`` (tokens
in id order, ``[PAD{i}]`` for ids the tokenizer lacks, added tokens CONTROL or USER_DEFINED,
``gguf.SpecialVocab`` for merges, special ids and ``tokenizer.chat_template``) and
``get_vocab_base_pre`` (the sha256 of the token ids of a fixed text picks ``tokenizer.ggml.pre``;
``smollm`` for SmolLM/SmolLM2). Whether BOS and EOS are added is measured with transformers rather
than parsed from the post-processor. :func:`read_vocab` reads it; :func:`write_vocab` writes it
after the model's keys (``export/gguf.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from base.errors import SurgeonError
from base.loading import load_tokenizer

# convert_hf_to_gguf.py, get_vocab_base_pre: this text's token ids identify the BPE pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
# The hashes of convert_hf_to_gguf.py's table for Llama-family tokenizers (name in llama-vocab.cpp).
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3 (Llama)
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass
class GgufVocab:
    """A tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary reads it."""

    tokens: list[str]
    toktypes: list[int]
    pre: str
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    special: Any = field(repr=False)  # gguf.SpecialVocab


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """convert_hf_to_gguf.py's get_vocab_base + _set_vocab_gpt2, for BPE ``tokenizer.json`` files."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise SurgeonError(f"{model_dir}: no tokenizer.json; GGUF export writes BPE (gpt2-style) tokenizers only, yet")
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"{tj_path}: not valid JSON ({exc})") from None
    bpe = tj.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
        fallback = " with byte fallback" if bpe.get("byte_fallback") else ""
        raise SurgeonError(f"{tj_path}: a {bpe.get('type')} tokenizer{fallback}; "
                           "GGUF export writes byte-level BPE (gpt2-style) tokenizers only, yet")
    tokenizer: Any = load_tokenizer(model_dir)
    pre = _pre_tokenizer(tokenizer, tj, tj_path)

    vocab = tokenizer.get_vocab()
    reverse = {i: tok for tok, i in vocab.items()}
    if vocab and max(reverse) >= vocab_size:
        raise SurgeonError(f"the tokenizer (as transformers loads it) has token {reverse[max(reverse)]!r} with id "
                           f"{max(reverse)}, beyond config.json's vocab_size {vocab_size}")
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not added_decoder[i].normalized:  # llama.cpp expects pre-normalised added tokens
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    dupes = [t for t, n in Counter(tokens).items() if n > 1]
    if dupes:
        raise SurgeonError(f"token {dupes[0]!r} appears twice in the vocabulary; llama.cpp needs unique tokens")

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SurgeonError(f"{tj_path}: no BPE merges; llama.cpp's gpt2 tokenizer needs them")
    # What transformers does, measured, rather than parsed from the post-processor.
    probe = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
    add_eos = eos is not None and len(probe) > len(plain) and probe[-1] == eos
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    config_path = model_dir / "tokenizer_config.json"
    add_space_prefix = None
    if config_path.is_file():
        add_space_prefix = json.loads(config_path.read_text(encoding="utf-8")).get("add_prefix_space")
    return GgufVocab(tokens, [int(t) for t in toktypes], pre, add_bos, add_eos,
                  add_space_prefix if isinstance(add_space_prefix, bool) else None, special)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py, does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_tokenizer(tokenizer: Any, tj: dict, path: Path) -> str:
    """``tokenizer.ggml.pre``: convert_hf_to_gguf's hash table first, else the structure of tokenizer.json.

    The structural cases are the two whose llama.cpp regexes (llama-vocab.cpp, ``LLAMA_VOCAB_PRE_TYPE_GPT2``
    and ``_SMOLLM``) are exactly what the tokenizers library runs for them: a plain ByteLevel pre-tokenizer
    with the GPT-2 regex ("gpt-2"), and Digits(individual) then ByteLevel ("smollm").
    """
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[chkhsh]
    model = tj.get("model") or {}
    plain_bpe = (tj.get("normalizer") is None and not model.get("ignore_merges")
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))

    def byte_level(p: Any) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) \
            and not p.get("add_prefix_space", False)

    pre = tj.get("pre_tokenizer")
    if plain_bpe and byte_level(pre):
        return "gpt-2"
    if plain_bpe and isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
                and byte_level(steps[1]):
            return "smollm"
    raise SurgeonError(
        f"{path}: BPE pre-tokenizer not recognised (chkhsh {chkhsh[:16]}...); GGUF export knows "
        f"{', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))} by hash, and plain ByteLevel/Digits+ByteLevel"
    )


def write_vocab(writer: Any, vocab: GgufVocab) -> None:
    """The vocabulary's keys (_set_vocab_gpt2), after the model's own metadata."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.toktypes)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)


__all__: list[str] = ["GgufVocab", "read_vocab", "write_vocab"]
