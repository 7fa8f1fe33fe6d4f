"""Studying programs of layers.

    tasks         the task suite (few-shot question families, splits, prompts)
    text/checker  the answer checker: is an answer the expected one?
    prompts       how a prompt is run (few-shot text or chat) and where its answer ends
    scoring       is a program valid for a question? (teacher forcing, decoding)
    search        MCTS and greedy searches over programs (ask/tell)
    find          valid programs for task items and for one prompt, verified by decoding
    supervision   searched programs per question on disk (the reference's format)
    router/       the predictor: config, network, checkpoints, features, training, beam search
    tables        evaluation results as honest tables (pandas)
    evaluate      router vs full program vs static baselines vs search
    analysis      per-run analyses of a trace (similarity, logit lens, answer change)
    redundancy    model-level layer redundancy and the static programs built from it

Uses polar_core.engine to run programs; never imports the app.
"""
