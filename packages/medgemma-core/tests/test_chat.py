"""The Gemma 3 chat format against the checkpoints' own Jinja chat template, rendered by
transformers, and image expansion (the processor's) against transformers' Gemma3Processor."""

from __future__ import annotations

import pytest

from medgemma_core.chat import format_chat, split_thinking

# The chat template Gemma 3 / MedGemma instruction-tuned checkpoints ship (tokenizer_config.json
# "chat_template"; the same text as `_CHAT_TEMPLATE` in transformers'
# models/gemma3/convert_gemma3_weights.py). The 270M GGUF carries none, so it is the reference
# data here, rendered by transformers' apply_chat_template.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the normal adult heart rate?"}],
    "system": [{"role": "system", "content": "You are an expert radiologist."},
               {"role": "user", "content": "  Describe a pneumothorax.\n"}],
    "multi_turn": [
        {"role": "system", "content": [_text("Answer briefly.")]},
        {"role": "user", "content": "Define tachycardia."},
        {"role": "assistant", "content": "A heart rate above 100/min.\n\n"},
        {"role": "user", "content": [_text("And bradycardia?")]},
        {"role": "model", "content": "Below 60/min."},
        {"role": "user", "content": "Thanks — 谢谢 😀\n\n"},
    ],
    "images": [
        {"role": "user", "content": [_text("Compare "), {"type": "image"},
                                     _text("  with\n"), {"type": "image", "url": "x.png"}]},
        {"role": "assistant", "content": [_text("The second shows an effusion.")]},
        {"role": "user", "content": [{"type": "image"}]},
    ],
    "special_text": [{"role": "user", "content": "Is <end_of_turn> a token?\t"}],
    "whitespace_system": [{"role": "system", "content": "  keep my spaces  "},
                          {"role": "user", "content": [_text("q")]}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_format_chat_matches_reference_template(name, add_generation_prompt, reference_tokenizer,
                                                gemma_tokenizer):
    messages = CONVERSATIONS[name]
    ref = reference_tokenizer.apply_chat_template(
        messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=add_generation_prompt)
    ours = format_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    ref_ids = reference_tokenizer.apply_chat_template(
        messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=True, return_dict=False,
        add_generation_prompt=add_generation_prompt)
    assert gemma_tokenizer.encode(ours) == list(ref_ids)
    assert ours.count("<bos>") == 1 and gemma_tokenizer.encode(ours)[:2] == [2, 105]


def test_format_chat_layout():
    """REFERENCE.md section 2, written out by hand."""
    assert format_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == (
        "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n")
    assert format_chat([{"role": "user", "content": "U"}], bos=False,
                       add_generation_prompt=False) == "<start_of_turn>user\nU<end_of_turn>\n"


@pytest.mark.parametrize("messages, reference_raises", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True),
    ([{"role": "assistant", "content": "a"}], True),
    ([{"role": "system", "content": "s"}, {"role": "model", "content": "a"}], True),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], True),
    # the template silently drops these or renders nonsense; we refuse them
    ([{"role": "system", "content": "only a system prompt"}], False),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], False),
    ([{"role": "user", "content": [{"type": "video"}]}], False),
    ([{"role": "user", "content": 42}], True),
    ([{"role": "tool", "content": "x"}], True),
    ([], False),
])
def test_format_chat_rejects_bad_conversations(messages, reference_raises, reference_tokenizer):
    with pytest.raises(ValueError) as err:
        format_chat(messages)
    assert len(str(err.value).splitlines()) == 1
    if reference_raises:
        with pytest.raises(Exception):  # noqa: B017 - jinja2's TemplateError / transformers'
            reference_tokenizer.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE,
                                                    tokenize=False)


def test_alternation_error_names_the_rule():
    with pytest.raises(ValueError, match="alternate user/model"):
        format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_image_expansion_matches_gemma3_processor(hf_folder_reference, hf_folder_tokenizer):
    """Our chat string, the processor's image expansion and the tokenizer == transformers'
    Gemma3Processor."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")  # the processor's image half needs Pillow
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from medgemma_core import Processor, ProcessorConfig

    ref_tok, _ = hf_folder_reference
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(), tokenizer=ref_tok,
                                image_seq_length=256)
    prompt = format_chat(CONVERSATIONS["images"])
    pixels = image.fromarray(np.zeros((32, 32, 3), np.uint8))
    ref = processor(text=prompt, images=[pixels] * 3, add_special_tokens=False)["input_ids"][0]
    ours_processor = Processor(hf_folder_tokenizer, ProcessorConfig(mm_tokens_per_image=256))
    ours = ours_processor.process_text(prompt, [np.zeros((32, 32, 3), np.uint8)] * 3).input_ids
    assert ours == list(ref)
    assert ours.count(262144) == 3 * 256 and ours.count(255999) == ours.count(256000) == 3


def test_image_expansion_layout(hf_folder_tokenizer):
    import numpy as np

    from medgemma_core import Processor, ProcessorConfig

    tok = hf_folder_tokenizer
    proc = Processor(tok, ProcessorConfig(image_size=28, mm_tokens_per_image=3))
    got = proc.process_text("a<start_of_image>b", [np.zeros((8, 8), np.uint8)]).input_ids
    assert got == tok.encode("a\n\n<start_of_image><image_soft_token><image_soft_token>"
                             "<image_soft_token><end_of_image>\n\nb")
    assert proc.process_text("no images").input_ids == tok.encode("no images")
    with pytest.raises(ValueError, match="positive"):
        ProcessorConfig(mm_tokens_per_image=0)


def test_split_thinking_on_decoded_ids(gemma_tokenizer):
    """MedGemma 27B thinks between <unused94> (id 100) and <unused95> (id 101)."""
    tok = gemma_tokenizer
    ids = ([100] + tok.encode("thought\nThe lesion is benign.") + [101]
           + tok.encode("Benign.") + [106])
    text = tok.decode(ids)
    assert text.startswith("<unused94>thought\n")
    assert split_thinking(tok.decode(ids[:-1])) == ("The lesion is benign.", "Benign.")
    assert split_thinking("Plain answer.") == (None, "Plain answer.")
    assert split_thinking("<unused94>thought\nstill thinking") == ("still thinking", "")
    assert split_thinking("lost start<unused95> answer") == ("lost start", "answer")
