"""The guide's "Asynchronous Generation" against the server (`make run`; $TEXTGEN_TARGET picks another).

async_generation.py is the same script in process: only the import of AutoModelForCausalLM differs.
"""

import asyncio

from transformers import AutoTokenizer

from clients import RemoteModelForCausalLM as AutoModelForCausalLM  # the one changed line
from engine.loader import resolve_model_folder

model_id = "default"  # the embedded SmolLM2-135M-Instruct

model = AutoModelForCausalLM.from_pretrained(model_id, use_fp8=True)  # FP8 where the device has it
tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(model_id))  # the model's tokenizer files


async def main():
    prompt = "What is the latest generation of Nvidia GPUs?"
    messages = [{"role": "user", "content": prompt}]
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

    # Await the generation result
    generated_ids = await model.agenerate(tokens["input_ids"], max_new_tokens=50)

    generated_text = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
    print(generated_text)


if __name__ == "__main__":
    asyncio.run(main())
