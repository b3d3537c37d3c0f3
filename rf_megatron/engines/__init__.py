"""The two training engines behind one loop (rf_megatron/training_loop.py): `megatron` (Megatron-Core: TP / SP / PP /
DP, the flagship) and `deepspeed` (the Hugging Face model under DeepSpeed ZeRO, data parallel; `deepspeed_config`
resolves its JSON, `deepspeed_model` builds, loads and writes its model). Imported lazily by the entry points:
each pulls in its framework."""
