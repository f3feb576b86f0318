"""Training ids and labels equal LLaVA-1.5's, on a Vicuna-style sentencepiece tokenizer (no tokenizer.json),
with ``"legacy": true`` and with ``"legacy": false`` in its tokenizer_config.json.

The reference below is LLaVA's rules restated from its source (llava/train/train.py: preprocess_multimodal,
preprocess_v1, preprocess_plain; llava/mm_utils.py: tokenizer_image_token; llava/conversation.py:
conv_vicuna_v1, conv_llava_plain), run on the tokenizer LLaVA loads (``use_fast=False``): transformers 4.3x's
slow LlamaTokenizer, restated from its rules on top of sentencepiece itself (:class:`SlowLlamaTokenizer`).
LLaVA marks an image with one -200 position; our pipeline expands it to ``tokens_per_image`` copies of the
``<image>`` token, so ours is compared with each run collapsed.
"""

import json
import re
from pathlib import Path

import pytest

from vlm.chat_templates import resolve_chat_template
from vlm.config import DataConfig
from vlm.data.templates import encode
from vlm.processor import load_tokenizer

IGNORE, IMAGE = -100, -200  # LLaVA's IGNORE_INDEX and IMAGE_TOKEN_INDEX
N = 5  # visual tokens per image in our pipeline
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


# ---- the tokenizer LLaVA runs ---------------------------------------------------------------------

class SlowLlamaTokenizer:
    """transformers 4.3x's slow LlamaTokenizer on a ``tokenizer.model``, restated (tokenize, _tokenize,
    get_spm_processor): text is split at the special tokens and each piece between them encoded by sentencepiece.

    - legacy: sentencepiece's own dummy prefix, so every piece, also one after ``</s>``, starts with "▁";
    - non-legacy: the dummy prefix is switched off in the model; "▁" is prepended once to the whole text
      (and dropped again when a special token follows it), and a piece starting with a space is encoded
      behind ``<unk>`` so that its leading "▁" survives.
    """

    SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}

    def __init__(self, model_file: Path, legacy: bool) -> None:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(Path(model_file).read_bytes())
        if not legacy:
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.bos_token_id, self.unk_token_id = self.SPECIAL["<s>"], self.SPECIAL["<unk>"]
        self.unk_length = len(self.sp.encode("<unk>", out_type=str))

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = "\u2581" + text.replace("\u2581", " ")
        pieces = []
        for part in re.split("(<unk>|<s>|</s>)", text):
            pieces += [part] if part in self.SPECIAL else self._tokenize(part) if part else []
        if not self.legacy and len(pieces) > 1 and pieces[0] == "\u2581" and pieces[1] in self.SPECIAL:
            pieces = pieces[1:]
        return pieces

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith(("\u2581", " ")):
            return self.sp.encode(text, out_type=str)
        return self.sp.encode("<unk>" + text, out_type=str)[self.unk_length:]

    def __call__(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: BOS, then the pieces' ids."""
        return [self.bos_token_id] + [self.SPECIAL[p] if p in self.SPECIAL else self.sp.piece_to_id(p)
                                    for p in self.tokenize(text)]


def write_vicuna_tokenizer(folder: Path, legacy: bool) -> Path:
    """The Vicuna-style test tokenizer (tokenizer.model only) with ``legacy`` set in its config."""
    from vlm.testing import train_sentencepiece_tokenizer

    train_sentencepiece_tokenizer(folder)
    set_legacy(folder, legacy)
    return folder


def set_legacy(folder: Path, legacy: bool) -> None:
    config = Path(folder, "tokenizer_config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), "legacy": legacy}, indent=2))


def test_the_reference_tokenizer_differs_by_legacy_only_after_special_tokens(tmp_path):
    """transformers' own example (LlamaTokenizer docstring): "Hello <s>." ends in "▁." when legacy, "." when not."""
    folder = write_vicuna_tokenizer(tmp_path, True)
    legacy, modern = (SlowLlamaTokenizer(folder / "tokenizer.model", flag) for flag in (True, False))
    assert legacy.tokenize("Hello <s>.")[-2:] in (["\u2581", "."], ["<s>", "\u2581."])
    assert modern.tokenize("Hello <s>.")[-2:] == ["<s>", "."]
    for text in ["A chat USER: hi", "\nWhat is shown?", " reads 42 .", "what is 2 + 2 ?"]:
        assert legacy.tokenize(text) == modern.tokenize(text)  # both start a call with "▁"
    assert legacy.tokenize(" reads")[:2] == ["\u2581", "\u2581re"]  # a leading space keeps its own "▁"


# ---- LLaVA's rules -------------------------------------------------------------------------------

def llava_multimodal(turns: list[dict]) -> list[dict]:
    """preprocess_multimodal: a turn holding <image> becomes "<image>\\n" + the rest stripped."""
    out = []
    for turn in turns:
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def llava_tokenizer_image_token(prompt: str, tokenizer: SlowLlamaTokenizer) -> list[int]:
    """Each text chunk around <image> tokenized on its own; one BOS kept; -200 where the image goes."""
    chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for number, chunk in enumerate(chunks):
        if number:
            ids.append(IMAGE)
        ids += chunk[offset:]
    return ids


def llava_v1(turns: list[dict], tokenizer: SlowLlamaTokenizer, has_image: bool, legacy: bool,
             model_max_length: int = 2048) -> tuple[list[int], list[int], bool]:
    """preprocess_v1 with conv_vicuna_v1 (sep " ", sep2 "</s>"): ids, labels, and whether LLaVA's
    "tokenization mismatch" check fired (then every label is IGNORE). ``legacy`` is what LLaVA's per-round
    adjustment reads (``tokenizer.legacy``, with tokenizers >= 0.14)."""
    if has_image:
        turns = llava_multimodal(turns)
    prompt = SYSTEM + " "
    for j, turn in enumerate(turns):
        role = ("USER", "ASSISTANT")[j % 2]
        prompt += f"{role}: {turn['value']}{(' ', '</s>')[j % 2]}" if turn["value"] else f"{role}:"
    count = (lambda text: llava_tokenizer_image_token(text, tokenizer)) if has_image else tokenizer
    ids = count(prompt)  # text-only prompts are truncated to model_max_length by the tokenizer: none is here
    labels = list(ids)
    total_len = sum(token != tokenizer.unk_token_id for token in ids)  # LLaVA pads with unk
    sep = " ASSISTANT: "
    cur_len = 1
    labels[:cur_len] = [IGNORE]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(count(rou)), len(count(parts[0])) - 2
        if i != 0 and not legacy:  # LLaVA's adjustment for non-legacy tokenizers (tokenizers >= 0.14)
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur_len:cur_len + instruction_len] = [IGNORE] * len(labels[cur_len:cur_len + instruction_len])
        cur_len += round_len
    labels[cur_len:] = [IGNORE] * len(labels[cur_len:])
    mismatch = cur_len < model_max_length and cur_len != total_len
    return ids, [IGNORE] * len(labels) if mismatch else labels, mismatch


def llava_plain(turns: list[dict], tokenizer: SlowLlamaTokenizer) -> tuple[list[int], list[int]]:
    """preprocess_plain with conv_llava_plain (sep "\\n"): <image> + caption + "\\n", loss after the image."""
    ids = llava_tokenizer_image_token("<image>" + turns[1]["value"] + "\n", tokenizer)
    prompt_len = len(llava_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE] * prompt_len + ids[prompt_len:]


# ---- ours, compared --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def folder(request, tmp_path_factory) -> Path:
    folder = write_vicuna_tokenizer(tmp_path_factory.mktemp("vicuna"), request.param)
    assert not (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    loaded = load_tokenizer(str(folder))  # what build_vlm does: <image> added as a special token
    loaded.chat_template = resolve_chat_template("vicuna_v1")
    return loaded


@pytest.fixture(scope="module")
def llava(folder, tokenizer) -> SlowLlamaTokenizer:
    return SlowLlamaTokenizer(folder / "tokenizer.model", tokenizer.legacy)


def ours(turns: list[dict], tokenizer, template: str = "chat", max_length: int = 4096,
         on_too_long: str = "skip") -> tuple[list[int], list[int]]:
    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in turns]
    return encode(messages, tokenizer, template, "<image>", N, max_length, on_too_long)


def collapse(ids: list[int], labels: list[int], image_id: int) -> tuple[list[int], list[int]]:
    """Our run of N image slots as LLaVA's single -200 position."""
    kept = [k for k, token in enumerate(ids) if token != image_id or k == 0 or ids[k - 1] != image_id]
    return [IMAGE if ids[k] == image_id else ids[k] for k in kept], [labels[k] for k in kept]


def human_gpt(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[j % 2], "value": value} for j, value in enumerate(values)]


CONVERSATIONS = {
    "image-first": human_gpt("<image>\nWhat is shown?", "a panel with a red lamp"),
    "image-last": human_gpt("What is the asset code?\n<image>", "KX-4821"),
    "image-inline": human_gpt("  Describe <image> the panel. ", "the gauge reads 42 ."),
    "multi-turn image-first": human_gpt("<image>\nIs the fault lamp on?", "yes, it is red",
                                        "What does the gauge read?", "42", "And the code?", "KX-4821"),
    "multi-turn image-last": human_gpt("Is the fault lamp on?\n<image>", "yes", "What does the gauge read?", "42"),
    "image in a later turn": human_gpt("Hi there", "Hello", "<image>\nwhat is the code ?", "KX-4821"),
    "text-only": human_gpt("Hi there", "Hello"),
    "multi-turn text-only": human_gpt("Hi there", "Hello", "what is 2 + 2 ?", "4, a number"),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_vicuna_v1_ids_and_labels_equal_llava_preprocess_v1(tokenizer, llava, name):
    turns = CONVERSATIONS[name]
    has_image = any("<image>" in t["value"] for t in turns)
    expected_ids, expected_labels, mismatch = llava_v1(turns, llava, has_image, legacy=llava.legacy)
    assert not mismatch  # LLaVA trains this sample normally
    ids, labels = ours(turns, tokenizer)
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == N * has_image
    assert collapse(ids, labels, tokenizer.convert_tokens_to_ids("<image>")) == (expected_ids, expected_labels)


def test_the_two_legacy_settings_give_different_ids(tmp_path):
    """What the parametrized tests above tell apart: "</s>USER" and "<image>\\n" tokenize differently."""
    turns = CONVERSATIONS["multi-turn image-first"]
    ids = {}
    for legacy in (True, False):
        tokenizer = load_tokenizer(str(write_vicuna_tokenizer(tmp_path / str(legacy), legacy)))
        tokenizer.chat_template = resolve_chat_template("vicuna_v1")
        ids[legacy] = ours(turns, tokenizer)[0]
    assert len(ids[True]) - len(ids[False]) == 2  # one "▁" after each of the two "</s>" before a later USER


@pytest.mark.parametrize("prompt", ["<image>\nRender a clear and concise summary of the photo.",
                                    "Render a clear and concise summary of the photo.\n<image>"])
@pytest.mark.parametrize("caption", ["select luxury furniture 3 - inch gel memory foam mattress topper",
                                     "3 - inch topper", " a leading space"])
def test_plain_ids_and_labels_equal_llava_preprocess_plain(tokenizer, llava, prompt, caption):
    turns = human_gpt(prompt, caption)
    ids, labels = ours(turns, tokenizer, "plain")
    expected_ids, expected_labels = llava_plain(turns, llava)
    assert collapse(ids, labels, tokenizer.convert_tokens_to_ids("<image>")) == (expected_ids, expected_labels)
    assert expected_ids[:2] == [tokenizer.bos_token_id, IMAGE]  # one BOS, then the image


def test_truncation_equals_llava_cutting_the_expanded_sequence(tokenizer, llava):
    # LLaVA's collator and llava_arch cut the sequence (images expanded) at model_max_length from the right.
    turns = CONVERSATIONS["multi-turn image-first"]
    full_ids, full_labels, _ = llava_v1(turns, llava, True, legacy=llava.legacy)
    image_at = full_ids.index(IMAGE)
    expanded_ids = full_ids[:image_at] + [IMAGE] * N + full_ids[image_at + 1:]
    expanded_labels = full_labels[:image_at] + [IGNORE] * N + full_labels[image_at + 1:]
    max_length = len(expanded_ids) - 7  # inside the last reply
    ids, labels = ours(turns, tokenizer, max_length=max_length, on_too_long="truncate")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert [IMAGE if t == image_id else t for t in ids] == expanded_ids[:max_length]
    assert labels == expanded_labels[:max_length]


@pytest.mark.parametrize("case", ["legacy flag disagrees", "question quoting the separator"])
def test_where_llava_zeroes_a_sample_we_keep_the_right_mask(tokenizer, llava, case):
    """LLaVA's "WARNING: tokenization mismatch ... (ignored)": every label of the sample becomes IGNORE.

    - Its per-round "-1" for non-legacy tokenizers is right only when the flag it reads agrees with how the
      tokenizer treats text after ``</s>``: a legacy tokenizer read as non-legacy (a config saying legacy: false
      that the tokenizer does not honour), or a non-legacy one with tokenizers < 0.14 (no adjustment), leaves
      each multi-turn sample one token off per later round.
    - A human turn that contains " ASSISTANT: " splits a round in three: the sample is dropped too.
    We never count tokens: the mask is taken from the rendering, so both keep their loss.
    """
    if case == "legacy flag disagrees":
        turns = CONVERSATIONS["multi-turn image-first"]
        zeroed_ids, zeroed, mismatch = llava_v1(turns, llava, True, legacy=not llava.legacy)
        _, right, _ = llava_v1(turns, llava, True, legacy=llava.legacy)
    else:
        turns = human_gpt("<image>\nAnswer in the form USER: x ASSISTANT: y. Is the lamp on?",
                          "USER: lamp ASSISTANT: on")
        zeroed_ids, zeroed, mismatch = llava_v1(turns, llava, True, legacy=llava.legacy)
        right = None
    assert mismatch and set(zeroed) == {IGNORE}
    ids, labels = ours(turns, tokenizer)
    collapsed_ids, collapsed_labels = collapse(ids, labels, tokenizer.convert_tokens_to_ids("<image>"))
    assert collapsed_ids == zeroed_ids  # the same tokens as LLaVA
    if right is not None:
        assert collapsed_labels == right
    assert supervised_runs(ids, labels, tokenizer) == [" " + t["value"] + "</s>" for t in turns[1::2]]


def test_llavas_non_legacy_adjustment_zeroes_samples_where_user_is_one_piece_either_way(tmp_path):
    """Llama's vocabulary has "▁US" and "US": a later round tokenized alone by a non-legacy tokenizer is then
    no longer one token longer than in place ("▁USER" against "USER" after </s>), LLaVA's "-1" leaves each one
    token short, and every multi-turn sample is zeroed. Ours has LLaVA's ids and the loss on each reply."""
    import io

    import sentencepiece

    lines = ["A chat between a curious user and an assistant. USER: is the lamp on? ASSISTANT: yes</s>USER: and "
             "the gauge? ASSISTANT: 42</s>", "the panel shows a gauge a tag and lamps . what is the asset code ?"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=420, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    write_vicuna_tokenizer(tmp_path, legacy=False)  # its config, with this tokenizer.model instead
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(str(tmp_path))
    tokenizer.chat_template = resolve_chat_template("vicuna_v1")
    llava = SlowLlamaTokenizer(tmp_path / "tokenizer.model", legacy=False)
    assert [llava.tokenize("USER:")[0], llava.tokenize("</s>USER:")[1]] == ["\u2581USER", "USER"]
    turns = CONVERSATIONS["multi-turn image-first"]
    zeroed_ids, zeroed, mismatch = llava_v1(turns, llava, True, legacy=False)
    assert mismatch and set(zeroed) == {IGNORE}
    _, right, _ = llava_v1(turns, llava, True, legacy=True)  # counting without the adjustment is right here
    ids, labels = ours(turns, tokenizer)
    assert collapse(ids, labels, tokenizer.convert_tokens_to_ids("<image>")) == (zeroed_ids, right)
    assert supervised_runs(ids, labels, tokenizer) == [" " + t["value"] + "</s>" for t in turns[1::2]]


def supervised_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The text of each run of tokens that carry loss (byte pieces such as <0x2C> read as their ASCII)."""
    runs, run = [], []
    for token, label in zip(ids + [0], labels + [IGNORE], strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            text = "".join(tokenizer.convert_ids_to_tokens(run)).replace("\u2581", " ")
            runs.append(re.sub("<0x([0-9A-F]{2})>", lambda byte: chr(int(byte.group(1), 16)), text))
            run = []
    return runs


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_training_dataset_yields_llava_ids_for_a_vicuna_model(tmp_path, legacy):
    """Through the training path (preflight + VLMDataset) on a tiny Vicuna-shaped VLM."""
    from PIL import Image

    from vlm import ModelConfig, build_vlm
    from vlm.data.dataset import VLMDataset
    from vlm.data.formats import load_records
    from vlm.data.preflight import check_records, enforce
    from vlm.testing import tiny_lm, tiny_tower

    tower, lm = tiny_tower(tmp_path / "clip"), tiny_lm(tmp_path / "vicuna", tokenizer="sentencepiece")
    set_legacy(lm, legacy)
    _, processor = build_vlm(ModelConfig(vision_tower=str(tower), language_model=str(lm), chat_template="vicuna_v1"))
    assert processor.tokenizer.legacy is legacy
    Image.new("RGB", (60, 40), "red").save(tmp_path / "panel.png")
    turns = CONVERSATIONS["multi-turn image-last"]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps([{"id": "1", "image": "panel.png", "conversations": turns}]))
    data = DataConfig(path=str(path), image_folder=str(tmp_path), template="chat")
    records = load_records(path)
    report = check_records(records, processor, data)
    dataset = VLMDataset(records, processor, data, report.lengths, skip_ids=enforce(report, 0.0, None))
    sample = dataset[0]
    ids, labels = collapse(sample["input_ids"].tolist(), sample["labels"].tolist(), processor.image_token_id)
    llava = SlowLlamaTokenizer(lm / "tokenizer.model", legacy)
    expected_ids, expected_labels, _ = llava_v1(turns, llava, True, legacy=legacy)
    assert (ids, labels) == (expected_ids, expected_labels)
    assert Path(lm, "tokenizer.model").is_file() and sample["pixel_values"].shape[0] == 1
