"""CUDA and bf16 paths, to run on a lent GPU machine (not a test; needs CUDA).

JSAE trainer in fp32 and bf16 on cuda for ReLU and TopK (pairs/s, explained variance), reload parity of a
cuda-trained SAE against CPU, then a tiny LLaVA in bf16 on cuda: nnsight trace, steered and SAE-ablated
`jsae.generate`, and bitwise-clean generation afterwards.  On the device image, carry py3.12 wheels of
sae-lens, transformer-lens, nnsight and their missing deps (see the device README), then
`PYTHONPATH=... python3 benchmarks/gpu_check.py`.
"""
import time, tempfile, torch, jsae
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from sae_lens import SAE
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
torch.manual_seed(0)
n, d = 65536, 1024
g = torch.Generator().manual_seed(0)
lat = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.1)
v = lat @ torch.randn(64, d, generator=g); t = lat @ torch.randn(64, d, generator=g)
for act in ("relu", "topk"):
    for dtype in ("float32", "bfloat16"):
        cfg = jsae.TrainingJointSAEConfig(d_in=d, d_sae=8192, activation=act, k=32, dtype=dtype, device="cuda")
        tr = JointSAETrainer.from_config(cfg, JointTrainerConfig(total_steps=300, lr=1e-3, device="cuda", progress=False, log_every=100), PairedTensorData(v, t, 2048))
        torch.cuda.synchronize(); t0 = time.time(); sae = tr.fit(); torch.cuda.synchronize(); dt = time.time() - t0
        h = tr.history[-1]
        print(f"{act:5s} {dtype:9s} 300 steps of 2048 pairs: {300*2048/dt:,.0f} pairs/s  EV vision {h['metrics/explained_variance_vision']:.3f} text {h['metrics/explained_variance_text']:.3f} L0 {h['metrics/l0_vision']:.1f}")
        d_ = tempfile.mkdtemp(); sae.save_model(d_)
        cpu = SAE.load_from_disk(d_, device="cpu", dtype="float32"); gpu = SAE.load_from_disk(d_, device="cuda")
        x = v[:256]
        diff = (gpu(x.cuda().to(gpu.dtype), "vision").float().cpu() - cpu(x.to(torch.float32), "vision")).abs().max().item()
        print(f"      reload on cuda ({gpu.dtype}) vs cpu float32: max |diff| {diff:.3g}; device {gpu.W_enc.device}")

# ---- adapters on CUDA, bf16: capture + steered / ablated generate on a tiny LLaVA ----
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
import nnsight
txt = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                       patch_size=4, projection_dim=32)
hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=txt, image_token_index=100, image_seq_length=16,
                                               vision_feature_layer=-1, vision_feature_select_strategy="default")).eval()
hf = hf.to("cuda", torch.bfloat16)
model = nnsight.NNsight(hf)
adapter = jsae.adapters.for_model(model)
ids = torch.tensor([[1, 5, 6] + [100] * 16 + [7, 8, 9], [1, 9, 6] + [100] * 16 + [7, 3, 4]], device="cuda")
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.bfloat16)}
img = adapter.image_token_mask(inputs)
with model.trace(**inputs):
    h = adapter.layers[2].output.save()
print("trace on", h.device, h.dtype, tuple(h.shape), "image tokens", int(img.sum()))
sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=64, d_sae=256, dtype="bfloat16", device="cuda"))
direction = torch.randn(64, device="cuda")
plain = jsae.generate(model, inputs, [], max_new_tokens=6, return_ids=True)
steered = jsae.generate(model, inputs, [jsae.Steer(2, "image", direction=direction, strength=8.0)], max_new_tokens=6, return_ids=True)
ablated = jsae.generate(model, inputs, [jsae.Ablate(2, "image", sae=sae, features=list(range(128)))], max_new_tokens=6, return_ids=True)
again = jsae.generate(model, inputs, [], max_new_tokens=6, return_ids=True)
print("generate cuda bf16: steered differs", not torch.equal(plain, steered), "| ablated differs", not torch.equal(plain, ablated),
      "| clean after", torch.equal(plain, again))
