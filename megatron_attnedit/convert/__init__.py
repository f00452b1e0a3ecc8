"""HF <-> megatron checkpoint conversion (the tables themselves are the families': families/).

hf_io.py               reading HF safetensors one tensor at a time; filling a megatron shard from HF
layout.py              megatron's checkpoint layout, read off a meta-device model
dist_ckpt.py           streaming torch_dist writer and chunk reader
legacy.py              legacy per-rank (mp_rank_*) files
hf_writer.py           streaming sharded safetensors writer; the dtype an export writes (--dtype, declared)
checks.py              what is read against what the config implies: shapes, weight dtypes, finite values
checkpoint.py          checkpoint directories and metadata; save/load for training code
                       (save_mcore_checkpoint, load_mcore_checkpoint_into_model, read_checkpoint_metadata)
converters.py          hf_to_mcore / mcore_to_hf end to end; cli.py, outdir.py around them
outdir.py              write aside and rename; manifest (--overwrite replaces only the tool's own output);
                       stale partial directories of killed runs removed by the next run
students.py            HF formats of students: reads the target from the metadata, its export (targets/<name>/export.py),
                       and the attnedit record in config.json
gguf_export.py         HF directory -> one GGUF for llama.cpp (hf_to_gguf.py, mcore_to_hf.py --gguf); why
                       written with the gguf package rather than llama.cpp's converter
gguf_layouts.py        llama.cpp's qwen3 / qwen3moe / deepseek2 layouts: hyper-parameters, tensor plan
gguf_vocab.py          the tokenizer in GGUF (SentencePiece BPE, byte-level BPE) as transformers tokenizes
"""
