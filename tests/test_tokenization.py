"""One tokenization rule (LLaVA's tokenizer_image_token) for training, the processor and chat; Hugging Face
Llava's whole-string rule behind a switch; a Llama tokenizer's legacy setting kept through save and reload."""

import random
from unittest import mock

import pytest
from PIL import Image
from test_llava_preprocess import (
    SlowLlamaTokenizer,
    collapse,
    human_gpt,
    llava_tokenizer_image_token,
    ours,
    set_legacy,
    write_vicuna_tokenizer,
)

from vlm import ModelConfig, VLMProcessor, build_vlm
from vlm.chat_templates import VICUNA_V1, resolve_chat_template
from vlm.data.templates import IGNORE, _labels, _overlaps
from vlm.processor import load_image_processor, load_tokenizer, tokenize_with_images
from vlm.session import ChatSession
from vlm.testing import tiny_lm

LEGACY = pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
PROMPTS = ["<image>\nwhat is the asset code ?", "is the lamp on ?\n<image>", "the gauge <image> reads 42 .<image>",
           "<s>USER: <image> what is it? ASSISTANT: a panel</s>USER: and <image><image>\nthis ? ASSISTANT:",
           "no image at all"]


def _vicuna(parts, folder, legacy: bool):
    lm = tiny_lm(folder, "llama", tokenizer="sentencepiece")
    set_legacy(lm, legacy)
    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(lm),
                                             chat_template="vicuna_v1"))
    assert processor.tokenizer.legacy is legacy
    return lm, model, processor


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_bpe_tokenizers_tokenize_the_same_split_at_images_or_whole(parts, lm):
    tokenizer = load_tokenizer(str(parts[lm]))
    split, whole = (VLMProcessor(tokenizer, load_image_processor(str(parts["clip"])), 3, split_at_images=flag)
                    for flag in (True, False))
    for prompt in PROMPTS:
        ids = split.encode(prompt)
        assert ids == whole.encode(prompt) == tokenizer(split.expand_image_tokens(prompt),
                                                        add_special_tokens=not prompt.startswith("<s>")).input_ids
        assert ids.count(split.image_token_id) == 3 * prompt.count("<image>")


@LEGACY
def test_the_whole_string_switch_is_hugging_face_llavas_rule(tmp_path, legacy):
    """LlavaProcessor tokenizes the expanded prompt in one call, so a non-legacy tokenizer writes no "▁" after the
    image, where LLaVA's chunk (and ours by default) starts with one."""
    tokenizer = load_tokenizer(str(write_vicuna_tokenizer(tmp_path, legacy)))
    split, whole = (VLMProcessor(tokenizer, None, 2, split_at_images=flag) for flag in (True, False))
    prompt = "USER: <image>\nwhat is it? ASSISTANT:"
    assert whole.encode(prompt) == tokenizer(whole.expand_image_tokens(prompt)).input_ids
    slow = SlowLlamaTokenizer(tmp_path / "tokenizer.model", legacy)
    ids = split.encode(prompt)
    assert collapse(ids, ids, split.image_token_id)[0] == llava_tokenizer_image_token(prompt, slow)
    after_image = ids[len(split.encode("USER: <image>")):][:2]
    assert tokenizer.convert_ids_to_tokens(after_image) == ["\u2581", "<0x0A>"]
    assert (ids == whole.encode(prompt)) is legacy  # legacy writes a "▁" after every special token


@LEGACY
def test_legacy_survives_save_and_reload(parts, tmp_path, legacy):
    """transformers 5 writes no "legacy" for a tokenizer.model-only Llama and reads a missing one as False."""
    from vlm import load_pretrained

    _, model, processor = _vicuna(parts, tmp_path / "vicuna", legacy)
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\nIs it on?"},
                                          {"role": "assistant", "content": "yes"},
                                          {"role": "user", "content": "the code?"}])
    model.save_pretrained(tmp_path / "saved", processor, full=True)
    _, reloaded = load_pretrained(tmp_path / "saved")
    reloaded.tokenizer.save_pretrained(tmp_path / "again")
    again = load_tokenizer(str(tmp_path / "again"))
    assert reloaded.tokenizer.legacy is again.legacy is legacy
    ids = processor.encode(text)
    assert reloaded.encode(text) == ids
    assert tokenize_with_images(again, text)[0] == tokenize_with_images(processor.tokenizer, text)[0]


def test_the_label_sweep_equals_checking_every_reply_for_every_token():
    """The one-sweep labels equal the plain rule (a token carries loss if it overlaps any reply) for tokens of
    no width, tokens straddling a reply's edge, image tokens and starts that step back."""
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, 80), 2 * rng.randint(0, 3)))
        replies = list(zip(cuts[::2], cuts[1::2], strict=True))
        starts = sorted(rng.randrange(80) for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.3:  # a start that steps back (a tokenizer whose offsets are not in order)
            starts.insert(rng.randrange(len(starts)), rng.randrange(80))
        spans = [(start, start + rng.choice([0, 1, 1, 2, 5])) for start in starts]
        tokens = [rng.choice([7, 8, 9]) for _ in spans]
        expected = [token if token != 9 and any(_overlaps(span, reply) for reply in replies) else IGNORE
                    for token, span in zip(tokens, spans, strict=True)]
        assert _labels(tokens, spans, replies, image_id=9) == expected, (spans, replies)


def test_the_leading_space_probe_is_asked_once_per_tokenizer(tmp_path):
    tokenizer = load_tokenizer(str(write_vicuna_tokenizer(tmp_path, False)))
    with mock.patch.object(tokenizer, "tokenize", wraps=tokenizer.tokenize) as probe:
        first = [tokenize_with_images(tokenizer, " a panel<image> reads 42", offsets=True) for _ in range(3)]
    assert probe.call_count <= 2  # the two probe calls, once: not two for each chunk that starts with a space
    assert first[0] == first[1] == first[2]


@LEGACY
def test_a_token_straddling_the_prompt_reply_boundary_is_the_replys_first(tmp_path, legacy):
    """A template whose generation prompt ends in a space ("ASSISTANT: ") cuts " yes" into prompt and reply;
    the token "▁y" carries loss, as LLaVA's rule (reply = after the instruction's tokens) has it, so the labels
    are vicuna_v1's. A "▁" of its own (before a digit) lies wholly in that prompt, as it would at inference."""
    tokenizer = load_tokenizer(str(write_vicuna_tokenizer(tmp_path, legacy)))
    spaced = VICUNA_V1.replace("{{ 'ASSISTANT:' }}", "{{ 'ASSISTANT: ' }}")
    words = human_gpt("<image>\nIs the fault lamp on?", "yes, it is red", "What does the gauge read?",
                      "the gauge reads 42")
    digits = human_gpt("<image>\nWhat does the gauge read?", "42")
    tokenizer.chat_template = resolve_chat_template("vicuna_v1")
    words_v1, digits_v1 = ours(words, tokenizer), ours(digits, tokenizer)
    tokenizer.chat_template = spaced
    words_spaced, digits_spaced = ours(words, tokenizer), ours(digits, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nIs it on?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("ASSISTANT: ")
    ids, spans = tokenize_with_images(tokenizer, prompt + "yes</s>", offsets=True)
    straddling = [token for token, (start, end) in zip(ids, spans, strict=True) if start < len(prompt) < end]
    assert tokenizer.convert_ids_to_tokens(straddling) == ["\u2581y"]
    assert words_spaced == words_v1
    first = next(k for k, label in enumerate(words_v1[1]) if label != -100)
    assert tokenizer.convert_ids_to_tokens(words_v1[0][first - 1:first + 1]) == [":", "\u2581y"]
    assert digits_spaced[0] == digits_v1[0]
    supervised = [[token for token in labels if token != -100] for labels in (digits_v1[1], digits_spaced[1])]
    assert [tokenizer.convert_ids_to_tokens(tokens) for tokens in supervised] == [["\u2581", "4", "2", "</s>"],
                                                                                  ["4", "2", "</s>"]]


@LEGACY
def test_chat_session_prompts_are_the_processors_and_later_turns_continue_as_llava(parts, tmp_path, monkeypatch,
                                                                                    legacy):
    lm, model, processor = _vicuna(parts, tmp_path / "vicuna", legacy)
    fed: list[list[int]] = []
    generate = model.generate

    def spy(**kwargs):  # records what each turn feeds the model, then generates as usual
        fed.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    # Replies of whole words (random weights would also say stray bytes, which re-render differently).
    words = processor.tokenizer.convert_tokens_to_ids(["\u2581the", "\u2581is", "</s>"])
    generation = model.language_model.generation_config
    generation.suppress_tokens = [k for k in range(len(processor.tokenizer)) if k not in words]
    generation.min_new_tokens = 1
    picture = Image.new("RGB", (70, 50), (200, 10, 10))
    session = ChatSession(model, processor, picture, max_new_tokens=4)
    session.ask("what is the asset code ?")
    first = processor.apply_chat_template(session.messages[:1])
    assert fed[0] == processor(images=[picture], text=first)["input_ids"][0].tolist()
    llava = SlowLlamaTokenizer(lm / "tokenizer.model", legacy)
    eos = processor.tokenizer.eos_token_id
    cached = session.token_ids[0].tolist()
    for turn, question in enumerate(["is the fault lamp on ?", "and the gauge ?"], start=1):
        session.ask(question)
        assert session.full_reencodes == 0 and fed[turn][:len(cached)] == cached  # the cache goes on
        tail = fed[turn][len(cached):]
        conversation = processor.apply_chat_template(session.messages[:-1])
        assert conversation.endswith(f"</s>USER: {question} ASSISTANT:")
        expected = llava_tokenizer_image_token(conversation.removeprefix("<s>"), llava)
        assert tail and tail == processor.encode(conversation)[-len(tail):] == expected[-len(tail):]
        assert (tail[0] == eos) is (cached[-1] != eos)  # a reply cut at max_new_tokens gets its </s> from the template
        cached = session.token_ids[0].tolist()
