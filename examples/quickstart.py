"""Build a VLM from a config, ask it about an image, save it, and export it for Hugging Face Llava.

    python -m vlm.testing --out runs/tiny-parts      # tiny random-weight parts (no download)
    python examples/quickstart.py --config configs/tiny.yaml --image some.jpg
"""

import argparse

from vlm import build_vlm, load_config
from vlm.hf_llava import export_llava

parser = argparse.ArgumentParser()
parser.add_argument("--config", default="configs/tiny.yaml")
parser.add_argument("--image", required=True)
parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.projector=merge2x2_mlp")
args = parser.parse_args()

config = load_config(args.config, args.overrides)
model, processor = build_vlm(config.model)
print(f"{model.config.tokens_per_image} visual tokens per image")
prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is the asset code?"}])
inputs = processor(images=[args.image], text=[prompt])
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print("answer:", processor.decode(output[0, inputs["input_ids"].shape[1]:]))
model.save_pretrained(config.output_dir, processor)
if config.model.projector == "mlp2x_gelu":
    export_llava(model, processor, f"{config.output_dir}-llava")
    print(f"saved {config.output_dir} and its Hugging Face Llava twin {config.output_dir}-llava")
