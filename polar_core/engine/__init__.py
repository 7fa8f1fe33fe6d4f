"""Running programs of layers.

    adapter    the one seam to transformers' internals (calling a decoder layer,
               its cache, rotary, masks), one entry per supported family
    models     load a model once (GGUF, local folder or hub id) and describe it
    inputs     prompts -> left-padded token ids; one program per row
    cache      the KV cache, one slot per program step
    forward    forward passes under per-row programs (prefill, logits)
    decoder    the bookkeeping of a generation loop; when rows stop
    drafts     speculative decoding with known answers as drafts
    generate   generate(lm, prompts, programs) -> Trace per prompt
    cpu/       CPU speed without changing what is computed: the GGUF codes
               (packed), the lean decode step (lean: one C call per program
               step; C source in csrc/) and weight layouts

Nothing here imports polar_core.study or the app.
"""
