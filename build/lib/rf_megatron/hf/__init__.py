"""Hugging Face export and import of rf-megatron models (transformers 5.x).

- `export.export`: a dist checkpoint of any layout -> an HF folder (vanilla: LlamaForCausalLM;
  resformer / svformer: RFGPTForCausalLM, shipped as configuration_rfgpt.py + modeling_rfgpt.py).
- `import_hf.import_hf`: an HF folder -> a trainer checkpoint in any TP / PP / VPP layout.
- `modeling_rfgpt`: the HF model, incl. `SharedValueCache` (SVFormer: K for every layer, V once).
- `weights`: the name / layout mapping; `tokenizer`: SentencePiece -> `tokenizer.json`.

CLIs: tools/convert_checkpoint_to_hf.py, tools/convert_hf_to_checkpoint.py. Nothing is imported
here, so `import rf_megatron.hf` stays cheap and Megatron-free.
"""
