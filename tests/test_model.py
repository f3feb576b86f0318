"""The VLM itself: joining images and text, what is frozen, generation, save/load."""

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm import CallbackStreamer, ModelConfig, ModelFolderError, build_vlm, load_pretrained
from vlm.projector import PROJECTORS, build_projector, projected_tokens
from vlm.testing import tiny_tower


def _picture(seed: int, size: int = 56) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_only_projector_trains_by_default(tiny_model):
    model, processor = tiny_model
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    inputs = processor(images=[_picture(0)], text=["<image>\nthe panel shows a gauge"])
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert grads == {"projector"}
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())
    model.zero_grad(set_to_none=True)
    model.train()
    assert not model.vision_tower.training and not model.vision_tower.encoder.training


def test_visual_tokens_fill_image_slots_and_never_carry_loss(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=[_picture(1)], text=["<image>\nwhat is the asset code"])
    slots = inputs["input_ids"] == model.config.image_token_id
    assert int(slots.sum()) == model.config.tokens_per_image == 16
    embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
    torch.testing.assert_close(embeds[slots], model.image_features(inputs["pixel_values"])[0])
    text_only = model.language_model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(embeds[~slots], text_only[~slots])
    # Labels that include the placeholder ids give the same loss as labels with those positions masked.
    masked = inputs["input_ids"].masked_fill(slots, -100)
    loss_a = model(**inputs, labels=inputs["input_ids"]).loss
    loss_b = model(**inputs, labels=masked).loss
    torch.testing.assert_close(loss_a, loss_b)


def test_count_mismatch_names_both_counts(tiny_model):
    model, processor = tiny_model
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        processor(images=[_picture(0)], text=["<image> and <image>"])
    two = processor(images=[_picture(0), _picture(1)], text=["<image> and <image>"])
    with pytest.raises(ValueError, match=r"32 image-token slots \(2 image\(s\).*1 image\(s\) gave 16 visual tokens"):
        model(input_ids=two["input_ids"], pixel_values=two["pixel_values"][:1])


def test_mixed_batch_forward_and_generate_match_single_samples(tiny_model):
    model, processor = tiny_model
    texts = ["a text only question about gauges", "<image> first <image> second: which is red?"]
    images = [[], [_picture(2), _picture(3)]]
    batch = processor(images=images, text=texts)
    assert batch["pixel_values"].shape[0] == 2
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, (text, pictures) in enumerate(zip(texts, images, strict=True)):
        single = processor(images=pictures or None, text=[text])
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert generated[row, -6:].tolist() == alone[0, -6:].tolist()
        torch.testing.assert_close(model(**single).logits[0, -1], logits[row, -1], atol=1e-4, rtol=1e-4)


def test_generate_sampling_and_streaming(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=[_picture(4)], text=["<image>\ndescribe the panel"])
    pieces: list[str] = []
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.0, min_new_tokens=8,
                             streamer=CallbackStreamer(processor.tokenizer, pieces.append))
    new_tokens = sampled[0, inputs["input_ids"].shape[1]:]
    assert len(new_tokens) == 8
    assert "".join(pieces).strip() == processor.decode(new_tokens).strip()
    assert model.config.image_token_id not in new_tokens.tolist()


def test_kv_cache_continues_a_chat_with_one_tower_run(tiny_model):
    model, processor = tiny_model
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = processor(images=[_picture(5)], text=["<image>\nwhat is the asset code"])
        turn1 = model.generate(**first, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        follow = processor(text=[" is the fault lamp on"])["input_ids"]
        ids = torch.cat([turn1.sequences, follow], dim=1)
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                past_key_values=turn1.past_key_values, max_new_tokens=4, do_sample=False)
        assert len(calls) == 1
        fresh = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=first["pixel_values"],
                               max_new_tokens=4, do_sample=False)
        assert cached[0, -4:].tolist() == fresh[0, -4:].tolist()
    finally:
        hook.remove()


def test_larger_image_interpolates_position_embeddings(tmp_path, parts):
    tower = tiny_tower(tmp_path / "clip336", "clip", image_size=336, layers=1)
    model, processor = build_vlm(ModelConfig(vision_tower=str(tower), language_model=str(parts["llama"]),
                                             image_size=448))
    assert model.config.tokens_per_image == (448 // 14) ** 2
    inputs = processor(images=[_picture(6, size=500)], text=["<image>\nwhat is shown"])
    assert inputs["pixel_values"].shape[-2:] == (448, 448)
    out = model(**inputs)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 1024
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(("projector", "select", "expected"), [
    ("linear", "patch", 16), ("mlp2x_gelu", "cls_patch", 17), ("merge2x2_mlp", "patch", 4)])
def test_projectors_and_token_counts(parts, projector, select, expected):
    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["qwen2"]),
                                             projector=projector, vision_feature_select=select))
    assert model.config.tokens_per_image == expected
    inputs = processor(images=[_picture(7)], text=["<image> hi"])
    assert model.image_features(inputs["pixel_values"]).shape == (1, expected, 64)
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_each_projector_in_the_table_makes_the_tokens_it_declares(name):
    kind = PROJECTORS[name]
    projector = build_projector(name, 8, 12, queries=5)
    for grid in (4, 6):  # even square grids, which every kind takes
        out = projector(torch.randn(2, grid * grid, 8))
        assert out.shape == (2, projected_tokens(name, grid * grid, 5), 12)
    assert (projected_tokens(name, 16, 5) == projected_tokens(name, 36, 5)) == kind.fixed_tokens
    if kind.even_square_grid:
        with pytest.raises(ValueError, match="even square patch grid"):
            projector(torch.randn(1, 9, 8))
    else:
        assert projector(torch.randn(1, 9, 8)).shape[-1] == 12


def test_an_unknown_projector_is_one_line_naming_the_known_ones():
    assert list(PROJECTORS)[:4] == ["linear", "mlp2x_gelu", "merge2x2_mlp", "query_pool_mlp"]
    with pytest.raises(ValueError, match=rf"^projector='conv' is not one of {', '.join(PROJECTORS)}$"):
        build_projector("conv", 8, 12)
    with pytest.raises(ValueError, match=r"^projector='conv' is not one of"):
        ModelConfig(projector="conv")


def test_query_pool_projector_puts_what_each_query_finds_at_its_own_token(parts):
    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["qwen2"]),
                                             projector="query_pool_mlp", projector_queries=5))
    assert model.config.tokens_per_image == 5
    inputs = processor(images=[_picture(7)], text=["<image> hi"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 5
    assert torch.isfinite(model(**inputs).logits).all()
    projector = model.projector
    features = torch.randn(2, 16, projector.norm.normalized_shape[0])
    with torch.no_grad():  # query 3 scores patch 11 far above the rest: token 3 is patch 11 through the MLP
        projector.scores.weight.zero_()
        projector.scores.bias.zero_()
        projector.scores.weight[3] = 50 * projector.norm(features[0, 11]).sign()
        out = projector(features)
    torch.testing.assert_close(out[0, 3], projector.mlp(projector.norm(features[0, 11])), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 0], projector.mlp(projector.norm(features).mean(1)), atol=1e-5, rtol=1e-5)
    # Queries that find the same patch give the same token until their query embeddings differ.
    with torch.no_grad():
        projector.scores.weight[4] = projector.scores.weight[3]
        same = projector(features)
        torch.testing.assert_close(same[:, 3], same[:, 4])
        projector.query_embeddings[4] = 1.0
        moved = projector(features)
    assert not torch.allclose(moved[:, 3], moved[:, 4]) and torch.equal(moved[:, 3], same[:, 3])


def test_siglip_has_no_cls_to_drop(parts):
    model, _ = build_vlm(ModelConfig(vision_tower=str(parts["siglip"]), language_model=str(parts["qwen2"])))
    assert model.vision_tower.prefix_tokens == 0 and model.config.tokens_per_image == 16


def test_whole_clip_checkpoint_loads_its_vision_half(parts):
    model, _ = build_vlm(ModelConfig(vision_tower=str(parts["clip_full"]), language_model=str(parts["llama"])))
    assert type(model.vision_tower.encoder).__name__ == "CLIPVisionModel"


@pytest.mark.parametrize("full", [True, False])
def test_save_and_load_give_the_same_model(tmp_path, tiny_model, full):
    model, processor = tiny_model
    with torch.no_grad():
        model.projector.linear_2.bias.add_(0.5)  # make sure the projector really is read back
    model.save_pretrained(tmp_path / "saved", processor, full=full)
    assert (tmp_path / "saved" / "config.json").is_file()
    assert (tmp_path / "saved" / "projector.safetensors").is_file()
    assert (tmp_path / "saved" / "language_model").is_dir() == full
    loaded, loaded_processor = load_pretrained(tmp_path / "saved")
    inputs = processor(images=[_picture(8)], text=["<image> check"])
    torch.testing.assert_close(loaded(**loaded_processor(images=[_picture(8)], text=["<image> check"])).logits,
                               model(**inputs).logits)
    with torch.no_grad():
        model.projector.linear_2.bias.sub_(0.5)


def test_save_and_load_keep_the_vocabulary_and_every_weight(tmp_path, tiny_model):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "saved", processor)
    loaded, loaded_processor = load_pretrained(tmp_path / "saved")
    assert len(loaded_processor.tokenizer) == len(processor.tokenizer)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_broken_weight_files_are_named_in_one_line(tmp_path, tiny_model):
    model, processor = tiny_model
    folder = tmp_path / "saved"
    model.save_pretrained(folder, processor)
    lm_file = folder / "language_model" / "model.safetensors"
    lm_name, projector_name = re.escape(str(lm_file)), re.escape(str(folder / "projector.safetensors"))
    whole = lm_file.read_bytes()
    for cut in (whole[: len(whole) // 2], b""):
        lm_file.write_bytes(cut)
        with pytest.raises(ModelFolderError, match=rf"^{lm_name} is not a complete safetensors file"):
            load_pretrained(folder)
    # The command line says the same in one line and exits 2.
    result = subprocess.run([sys.executable, "-m", "vlm.export", str(folder), str(tmp_path / "hf")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {lm_file} is not a complete safetensors file")
    lm_file.write_bytes(whole)
    tensors = load_file(lm_file)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.weight"}, lm_file,
              metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"^{lm_name}: lacks model\.layers\.0\.mlp\.up_proj\.weight$"):
        load_pretrained(folder)
    lm_file.write_bytes(whole)

    projector_file = folder / "projector.safetensors"
    projector = load_file(projector_file)
    save_file({k: v for k, v in projector.items() if k != "linear_2.bias"}, projector_file)
    with pytest.raises(ModelFolderError, match=rf"^{projector_name}: lacks linear_2\.bias"):
        load_pretrained(folder)
    save_file({**projector, "linear_2.weight": projector["linear_2.weight"][:, :3].contiguous()}, projector_file)
    with pytest.raises(ModelFolderError, match=r"mis-shaped linear_2\.weight \(\(64, 3\) in the file, \(64, 64\)"):
        load_pretrained(folder)
    projector_file.write_bytes(b"")
    with pytest.raises(ModelFolderError, match=rf"^{projector_name} is not a complete safetensors file"):
        load_pretrained(folder)
    projector_file.unlink()
    with pytest.raises(ModelFolderError, match=rf"^{projector_name} is missing"):
        load_pretrained(folder)


@pytest.mark.parametrize("component", ["vision_tower", "language_model"])
def test_a_declared_component_folder_must_be_there(tmp_path, tiny_model, component):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "saved", processor)
    (tmp_path / "saved" / component).rename(tmp_path / "elsewhere")
    missing = re.escape(str(tmp_path / "saved" / component))
    with pytest.raises(ModelFolderError, match=rf"declares its .* in {missing}, which is missing"):
        load_pretrained(tmp_path / "saved")


def test_a_stage2_result_refuses_to_load_without_its_adapter(tmp_path, parts):
    from peft import LoraConfig, get_peft_model

    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"])))
    model.language_model = get_peft_model(model.language_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; a real adapter changes the logits
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    folder = tmp_path / "stage2"
    model.save_pretrained(folder, processor, full=False, adapter=True)
    assert json.loads((folder / "config.json").read_text())["adapter"] is True
    config_name, adapter_name = re.escape(str(folder / "config.json")), re.escape(str(folder / "adapter"))
    with pytest.raises(ModelFolderError, match=rf"^{config_name} declares a LoRA adapter but {adapter_name} holds none"):
        load_pretrained(folder)
    model.language_model.save_pretrained(folder / "adapter", save_embedding_layers=False)
    loaded, loaded_processor = load_pretrained(folder)
    assert hasattr(loaded.language_model, "peft_config")
    inputs = processor(images=[_picture(9)], text=["<image> check"])
    torch.testing.assert_close(loaded(**loaded_processor(images=[_picture(9)], text=["<image> check"])).logits,
                               model(**inputs).logits)
    # Merged and saved whole, it needs no adapter any more.
    loaded.language_model = loaded.language_model.merge_and_unload()
    loaded.save_pretrained(tmp_path / "merged", loaded_processor)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["adapter"] is False
    merged, _ = load_pretrained(tmp_path / "merged")
    assert not hasattr(merged.language_model, "peft_config")


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a reachable hub repository"):
        load_pretrained(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("layout", ["image first", "image after differing text", "every image different"])
def test_generate_shared_gives_each_row_what_it_gets_alone(tiny_model, layout):
    model, processor = tiny_model
    pictures = [_picture(seed) for seed in range(5)]
    questions = ["what is it", "is the lamp on or off please", "gauge", "a b c d e f", "x"]
    image_of_row = [0, 1, 2, 3, 4] if layout == "every image different" else [0, 1, 0, 2, 1]
    lead = (lambda q: "<image>\n" + q) if layout == "image first" else (lambda q: q + "\n<image>")
    prompts = [processor.apply_chat_template([{"role": "user", "content": lead(q)}]) for q in questions]
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                    output_logits=True, pad_token_id=processor.tokenizer.pad_token_id)
    batch = processor(images=[pictures[i] for i in image_of_row], text=prompts, return_tensors="pt")
    towers = []
    handle = model.vision_tower.register_forward_hook(lambda module, args, out: towers.append(len(args[0])))
    try:
        shared = model.generate_shared(**batch, **settings)
    finally:
        handle.remove()
    # Image first: the tower sees the 3 distinct images once; otherwise it is plain batched generate.
    assert towers == ([3] if layout == "image first" else [5])
    assert shared.sequences.shape == (5, 4)
    for row, (image, prompt) in enumerate(zip(image_of_row, prompts, strict=True)):
        alone = model.generate(**processor(images=[pictures[image]], text=[prompt], return_tensors="pt"), **settings)
        for step_alone, step_shared in zip(alone.logits, shared.logits, strict=True):
            torch.testing.assert_close(step_shared[row], step_alone[0], atol=1e-4, rtol=0)
