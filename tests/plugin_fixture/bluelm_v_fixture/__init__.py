"""bluelm-v-fixture: one small, working third-party plugin of every bluelm-v family.

    tilers.py        tiler       square        one square crop, no thumbnail
    encoders.py      encoder     patch_embed   linear patch embedding (a ViT without layers)
    downsamplers.py  downsampler token_pool    mean of each run of `window` tokens
    projectors.py    projector   linear        one nn.Linear
    llms.py          llm         bag_lm        a causal running-mean LM with a byte tokenizer
    engines.py       engine      recompute     runs the whole sequence again for every token
    quantizers.py    quantizer   fp16_round    weights rounded through float16 (fake quantisation)
    backends.py      backend     wallclock     times the configured model through the runtime;
                                               + the bluelm_v_devices hook (BLUELM_V_FIXTURE_DEVICES)
    logger.py        hooks       job start / metrics / end as RUN_DIR/fixture_events.jsonl
    broken.py        a module that fails to import, as a mis-packaged plugin would

Each module is its own entry point (pyproject.toml) and imports torch only inside functions, so
`bluelm-v plugins` stays fast. docs/plugins.md explains every contract with these files.
"""
