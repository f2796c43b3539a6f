"""Which model families decode under a CUDA graph: ``packed.greedy_static(graph=True)`` on tiny random
OPT, Llama and Qwen2 models against ``model.generate``, twice each (the second run shows whether CUDA
still works after a failed capture). One JSON line per family. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/graph_decode_probe.py
"""
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

from sparsemix.packed import greedy_static

torch.manual_seed(0)
configs = {
    "opt": OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}
for name in ("llama", "qwen2", "opt"):
    config = configs[name]
    model = AutoModelForCausalLM.from_config(config).cuda().eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(4, 500, (1, 9), device="cuda")
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 9:].tolist()
        try:
            new, how = greedy_static(model, ids, 12, graph=True)
            again, _ = greedy_static(model, ids, 12, graph=True)  # CUDA still usable after a failed capture?
            print(json.dumps({"model": name, "same_as_generate": new == expected, "repeat_same": again == new, "decoder": how}))
        except Exception as error:
            print(json.dumps({"model": name, "error": repr(error)[:300]}))
