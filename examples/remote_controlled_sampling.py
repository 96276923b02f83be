"""The guide's "Controlled Sampling" against the server (`make run`; $TEXTGEN_TARGET picks another), with a seed so that a run can be repeated.

controlled_sampling.py is the same script in process: only the import of AutoModelForCausalLM differs.
"""

from transformers import AutoTokenizer

from clients import RemoteModelForCausalLM as AutoModelForCausalLM  # the one changed line
from engine.loader import resolve_model_folder

model_id = "default"  # the embedded SmolLM2-135M-Instruct

model = AutoModelForCausalLM.from_pretrained(model_id, use_fp8=True)  # FP8 where the device has it
tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(model_id))  # the model's tokenizer files

messages = [{"role": "user", "content": "What are the best things to do in Paris?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

# Use top-k and top-p sampling with a specific temperature
generated_ids = model.generate(
    inputs["input_ids"],
    max_new_tokens=100,
    do_sample=True,
    temperature=0.7,
    top_k=50,
    top_p=0.95,
    seed=42,  # the same seed gives the same tokens, in process or through the server
)

print(tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0])
