"""The guide's "Basic Generation" against the server (`make run`; $TEXTGEN_TARGET picks another).

basic_generation.py is the same script in process: only the import of AutoModelForCausalLM differs.
SmolLM2-Instruct is a chat model, so the question goes through its chat template.
"""

from transformers import AutoTokenizer

from clients import RemoteModelForCausalLM as AutoModelForCausalLM  # the one changed line
from engine.loader import resolve_model_folder

model_id = "default"  # the embedded SmolLM2-135M-Instruct

model = AutoModelForCausalLM.from_pretrained(model_id, use_fp8=True)  # FP8 where the device has it
tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(model_id))  # the model's tokenizer files

messages = [{"role": "user", "content": "What are the best things to do in Paris?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

# Generate text with default settings
generated_ids = model.generate(inputs["input_ids"], max_new_tokens=100)
decoded_text = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
print(decoded_text[0])
