"""The Gemma 3 tokenizer against transformers' tokenizer of the same real GGUF vocabulary."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from medgemma_core.tokenizer import Tokenizer, read_gguf_tokenizer_metadata

UNICODE = [
    "Café naïve résumé – œuvre, Ångström, São Paulo, Zürich, façade",
    "中文医学文本：患者主诉胸痛三天。日本語の診断書。한국어 진료 기록.",
    "مرحبا، كيف حالك؟ المريض يعاني من ألم في الصدر",
    "עברית: המטופל סובל מכאבים", "ไทย: ผู้ป่วยมีไข้", "Русский: у пациента лихорадка",
    "Emoji 😀👍🏽🧑‍⚕️🫀🧬💊 and flags 🇫🇷🇯🇵",
    "Math: ∑ᵢ xᵢ² ≤ ∫₀^∞ e^{-x} dx, √2 ≈ 1.414, α+β=γ, ∀ε>0 ∃δ, ℝⁿ, ∂f/∂x",
    "Combining: e\u0301 vs é, n\u0303, zero\u200bwidth, bom\ufeffhere, nbsp\u00a0x, ideographic\u3000y",
    "Ligatures ﬁ ﬂ, Roman Ⅻ, circled ①②, fraktur 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, rare 𠀀𪚥",
    "Control \x00\x01\x07\x7f\x1b[0m chars", "Surrogate-free 𝄞 music", "▁ literal ▁▁ bars",
]

WHITESPACE = (
    [" " * n for n in range(1, 70)] + ["\t" * n for n in range(1, 40)]
    + ["\n" * n for n in range(1, 40)] + [f"x{' ' * n}y" for n in range(1, 70)]
    + [f"a{' ' * n}\n{' ' * m}b" for n in range(4) for m in range(4)]
    + [" \t\n " * n for n in range(1, 12)] + ["line\r\nnext\r\n", "  leading", "trailing  ",
       "    def f(x):\n        return x\n", "\n\n\n\nfour", "a\u00a0\u00a0b", "\t \t \t"]
)

CHAT_TEXT = [
    "<bos><start_of_turn>user\nYou are a doctor.\n\nWhat is BP?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nDescribe <start_of_image> please<end_of_turn>\n<start_of_turn>model\nA CXR.",
    "<start_of_turn>model\n<unused94>thought\nThe answer is B.<unused95>B<end_of_turn><eos>",
    "<pad><pad><bos>x<unk><mask>[multimodal]<unused0><unused6241><end_of_image>",
    "<start_of_turn><start_of_turn>><<end_of_turn>start_of_turn><start_of_turn",
    "\n\n<start_of_image><end_of_image>\n\n<table><tr><td>1</td></tr></table></div><b>x</b>",
    "<0x41> is not a byte token in text; <image_soft_token> is not in this vocabulary",
]


def _qa_corpus(fixtures_dir) -> list[str]:
    texts = []
    files = sorted((fixtures_dir / "qa").glob("*.jsonl"))
    assert len(files) == 5
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            options = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
            texts += [row["question"], *row["options"].values(), f"{row['question']}\n{options}"]
    return texts


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list("abcxyz ABC019 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|") + [
        "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "é", "中", "日本語", "😀", "🧑‍⚕️", "∑",
        "مرحبا", "\u200b", "\x00", "▁", "▁▁", "<start_of_turn>", "<end_of_turn>", "<bos>",
        "<eos>", "<unk>", "<unused94>", "<start_of_image>", "<table>", "</div>", "<0x41>",
        "<start_of_turn", "end_of_turn>", "model\n", " the", "ing", "e\u0301", "𝔘𝔫"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def _assert_same_ids(ours: Tokenizer, ref, texts: list[str]) -> None:
    mismatches = [(t, ours.encode(t), ref.encode(t, add_special_tokens=False)) for t in texts]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, first: {mismatches[0]!r:.600}"


# ---- loading ---------------------------------------------------------------------------------

def test_gguf_metadata_matches_transformers_reader(gguf_path):
    from transformers.integrations.gguf import read_gguf_metadata

    ours = read_gguf_tokenizer_metadata(gguf_path)
    ref, _ = read_gguf_metadata(str(gguf_path), ("tokenizer.ggml.tokens",))
    assert len(ours["tokenizer.ggml.tokens"]) == 262144
    assert ours.keys() == {k for k in ref if k.startswith("tokenizer.")} | {"general.architecture"}
    for key, value in ours.items():
        # that reader gives numeric arrays (scores, token_type) as their lengths only
        assert (len(value) if isinstance(ref[key], int) and isinstance(value, list)
                else value) == ref[key], key


@pytest.mark.slow
def test_gguf_metadata_matches_gguf_package(gguf_path):
    import gguf

    ours = read_gguf_tokenizer_metadata(gguf_path)
    reader = gguf.GGUFReader(gguf_path)  # about 15 s for a 262,144-piece vocabulary
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert ours[key] == reader.fields[key].contents(), key


def test_vocabulary_matches_reference(gemma_tokenizer, reference_tokenizer):
    ours, ref = gemma_tokenizer, reference_tokenizer
    assert ours.vocab_size == len(ref) == 262144
    ref_pieces = ref.convert_ids_to_tokens(list(range(len(ref))))
    ours_pieces = [ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert ours_pieces == ref_pieces
    for piece in ("<start_of_turn>", "▁▁", "\n\n", "<0x0A>", "▁the", "<unused94>"):
        assert ours.piece_to_id(piece) == ref.convert_tokens_to_ids(piece)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        ours.piece_to_id("no such piece")


def test_special_ids_match_reference(gemma_tokenizer, reference_tokenizer):
    ours, ref = gemma_tokenizer, reference_tokenizer
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (2, 1, 0, 3)
    named = {"<start_of_turn>": ours.start_of_turn_id, "<end_of_turn>": ours.end_of_turn_id,
             "<start_of_image>": ours.boi_id, "<end_of_image>": ours.eoi_id}
    assert named == {k: ref.convert_tokens_to_ids(k) for k in named}
    assert list(named.values()) == [105, 106, 255999, 256000]  # REFERENCE.md section 2
    assert ours.stop_ids == {1, 106}
    assert ours.image_token_id is None  # the 270M text model's GGUF has no image soft token
    assert ours.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}


# ---- encode ----------------------------------------------------------------------------------

def test_encode_qa_corpus_matches_reference(gemma_tokenizer, reference_tokenizer, fixtures_dir):
    texts = _qa_corpus(fixtures_dir)
    assert len(texts) > 1000
    _assert_same_ids(gemma_tokenizer, reference_tokenizer, texts)


@pytest.mark.parametrize("group", ["unicode", "whitespace", "chat"])
def test_encode_matches_reference(gemma_tokenizer, reference_tokenizer, group):
    texts = {"unicode": UNICODE, "whitespace": WHITESPACE, "chat": CHAT_TEXT}[group]
    _assert_same_ids(gemma_tokenizer, reference_tokenizer, texts)


def test_encode_random_mixtures_match_reference(gemma_tokenizer, reference_tokenizer):
    _assert_same_ids(gemma_tokenizer, reference_tokenizer, _fuzz(2000))


def test_special_tokens_in_text_are_single_ids(gemma_tokenizer):
    tok = gemma_tokenizer
    assert tok.encode("<start_of_turn>user\n") == [105, tok.encode("user")[0], 107]
    assert tok.encode("<unused94><unused95>") == [100, 101]  # REFERENCE.md: thinking markers
    # 32 spaces: two BPE merges of 16, as the reference ranks merges, not a greedy 31 + 1
    assert tok.encode(" " * 32) == [tok.piece_to_id("▁" * 16)] * 2


def test_long_document_matches_reference(gemma_tokenizer, reference_tokenizer, fixtures_dir):
    texts = _qa_corpus(fixtures_dir)
    docs = ["\n\n".join(texts) * 3, " ".join(texts),  # one long line
            "\n".join(_fuzz(400, seed=2)), "\n\n\n".join(UNICODE + WHITESPACE) * 20]
    for doc in docs:
        assert len(doc) > 20_000
        assert gemma_tokenizer.encode(doc) == reference_tokenizer.encode(doc, add_special_tokens=False)


def test_add_bos_and_batch_match_reference(gemma_tokenizer, reference_tokenizer, fixtures_dir):
    texts = _qa_corpus(fixtures_dir)[:200] + UNICODE
    assert [gemma_tokenizer.encode(t, add_bos=True) for t in texts[:20]] == [
        reference_tokenizer.encode(t) for t in texts[:20]]  # the GGUF says add_bos_token
    batch = gemma_tokenizer.encode_batch(texts)
    assert batch == reference_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert gemma_tokenizer.encode_batch(texts[:3], add_bos=True)[0][0] == 2


def test_parse_special_false_matches_split_special_tokens(gemma_tokenizer, reference_tokenizer):
    for text in CHAT_TEXT:
        ours = gemma_tokenizer.encode(text, parse_special=False)
        ref = reference_tokenizer(text, add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]
        assert ours == ref, text
        assert 105 not in ours and 106 not in ours


def test_encode_rejects_non_strings(gemma_tokenizer):
    with pytest.raises(TypeError, match="encode_batch"):
        gemma_tokenizer.encode(["a list"])
    with pytest.raises(TypeError, match="list of str"):
        gemma_tokenizer.encode_batch(["ok", 3])


# ---- decode ----------------------------------------------------------------------------------

def _id_sequences(tok: Tokenizer, fixtures_dir) -> list[list[int]]:
    texts = _qa_corpus(fixtures_dir)[:300] + UNICODE + WHITESPACE + CHAT_TEXT
    seqs = [tok.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    byte_ids = np.arange(238, 238 + 256)  # <0x00> .. <0xFF>
    for _ in range(300):  # random mixtures: byte runs valid or not, specials, ordinary pieces
        parts = [rng.choice(byte_ids, rng.integers(1, 6)), rng.integers(0, 262144, 3),
                 np.array([105, 106, 2, 1, 138, 107]), rng.integers(500, 20000, 4)]
        seqs.append(np.concatenate([parts[i] for i in rng.permutation(4)]).tolist())
    return seqs


def test_decode_matches_reference(gemma_tokenizer, reference_tokenizer, fixtures_dir):
    for ids in _id_sequences(gemma_tokenizer, fixtures_dir):
        for skip in (False, True):
            assert gemma_tokenizer.decode(ids, skip_special_tokens=skip) == \
                reference_tokenizer.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_decode_round_trip_and_byte_fallback(gemma_tokenizer, fixtures_dir):
    tok = gemma_tokenizer
    for text in _qa_corpus(fixtures_dir) + UNICODE + WHITESPACE + CHAT_TEXT:
        if "▁" not in text:  # a literal ▁ decodes to a space, in the reference too
            assert tok.decode(tok.encode(text)) == text
    snowman = [238 + b for b in "☃".encode()]  # three byte pieces
    assert tok.decode(snowman) == "☃"
    assert tok.decode(snowman[:2] + [tok.piece_to_id("▁the")]) == "\ufffd\ufffd the"
    assert tok.decode(np.asarray(snowman)) == "☃"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 262144])


def test_stream_decoder_concatenates_to_decode(gemma_tokenizer, fixtures_dir):
    tok = gemma_tokenizer
    for ids in _id_sequences(tok, fixtures_dir):
        for skip in (False, True):
            stream = tok.stream_decoder(skip_special_tokens=skip)
            pieces = [stream.feed(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert "".join(tok.stream_decoder(skip_special_tokens=skip).decode(ids)) == \
                "".join(pieces)


def test_stream_decoder_never_emits_half_a_character(gemma_tokenizer):
    tok = gemma_tokenizer
    emoji = [238 + b for b in "🧬".encode()]  # four byte pieces
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in [tok.piece_to_id("DNA")] + emoji] == ["DNA", "", "", "", ""]
    assert stream.feed(tok.piece_to_id("▁helix")) == "🧬 helix"
    stream.feed(emoji[0])
    assert stream.flush() == "\ufffd"  # a run left incomplete at the end, as decode() does


# ---- files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(gemma_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    assert gemma_tokenizer.save(folder) == folder / "tokenizer.model"
    return folder


def test_saved_model_reloads_identically(gemma_tokenizer, saved_model, fixtures_dir):
    import sentencepiece as spm

    again = Tokenizer.from_file(saved_model / "tokenizer.model")
    texts = _qa_corpus(fixtures_dir)[:300] + UNICODE + WHITESPACE + CHAT_TEXT
    texts = [t for t in texts if "▁" not in t]  # literal ▁ runs: see the next test
    assert again.encode_batch(texts) == gemma_tokenizer.encode_batch(texts)
    sp = spm.SentencePieceProcessor(model_file=str(saved_model / "tokenizer.model"))
    assert sp.vocab_size() == 262144
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (2, 1, 0, 3)
    assert sp.id_to_piece(140) == "▁▁▁▁"  # a user-defined piece, spaces respelled
    assert sp.is_control(105) and not sp.is_control(107)


def test_transformers_reads_the_saved_model_the_same(hf_folder_reference, hf_folder_tokenizer,
                                                     fixtures_dir):
    """An independent path: transformers converts the tokenizer.model itself. Its tokenizer.json
    also matches ``▁▁`` pieces written literally in the text, which from_file follows."""
    ref, _ = hf_folder_reference
    ours = hf_folder_tokenizer  # tokenizer.model + the added <image_soft_token>
    texts = _qa_corpus(fixtures_dir)[::3] + UNICODE + WHITESPACE + CHAT_TEXT + _fuzz(500, seed=1)
    assert sum("▁▁" in t for t in texts) > 20
    _assert_same_ids(ours, ref, texts)
    assert ours.encode_batch(texts) == ref(texts, add_special_tokens=False)["input_ids"]


def test_hf_folder_with_added_image_token(hf_folder_reference, hf_folder_tokenizer):
    ref, _ = hf_folder_reference
    tok = hf_folder_tokenizer
    assert tok.vocab_size == len(ref) == 262145
    assert tok.image_token_id == ref.image_token_id == 262144
    assert tok.added_tokens == {262144: "<image_soft_token>"}
    text = "x<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\ny"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert 262144 not in tok.encode(text, parse_special=False)
    ids = [2, 105, 2364, 107, 138, 255999, 262144, 256000, 108, 9259, 106, 1, 100]
    for skip in (False, True):  # tokenizer.json marks <start_of_image> etc. special, not "\n"
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_hf_folder_of_older_transformers(hf_folder_reference, hf_folder_tokenizer, tmp_path):
    """Checkpoints saved by transformers 4.x list the added tokens in tokenizer_config.json."""
    ref, folder = hf_folder_reference
    shutil.copy(folder / "tokenizer.model", tmp_path / "tokenizer.model")
    decoder = {str(i): {"content": t.content, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": t.special}
               for i, t in ref.added_tokens_decoder.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.added_tokens == hf_folder_tokenizer.added_tokens == {262144: "<image_soft_token>"}
    assert tok.special_ids == hf_folder_tokenizer.special_ids
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read its added tokens"):
        Tokenizer.from_checkpoint(tmp_path)


def test_pickle_round_trip(hf_folder_tokenizer):
    import pickle

    tok = hf_folder_tokenizer
    again = pickle.loads(pickle.dumps(tok))
    text = "<start_of_turn>user\n▁▁x  y<image_soft_token><end_of_turn>"
    assert again.encode(text) == tok.encode(text)
    assert again.special_ids == tok.special_ids and again.added_tokens == tok.added_tokens


def test_from_checkpoint_dispatch(gguf_path, saved_model, tmp_path):
    assert Tokenizer.from_checkpoint(gguf_path).vocab_size == 262144
    assert Tokenizer.from_checkpoint(saved_model / "tokenizer.model").bos_id == 2
    assert Tokenizer.from_checkpoint(saved_model).eos_id == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Tokenizer.from_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_checkpoint(tmp_path)


def test_bad_files_give_clear_errors(gguf_path, tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))  # the vocabulary runs past the first MiB
    with pytest.raises(ValueError, match="truncated or corrupt GGUF"):
        Tokenizer.from_gguf(truncated)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(junk)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(junk)
