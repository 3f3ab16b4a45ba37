"""Data files shipped with the package: the aggregator prompt (Together MoA) and the weighted pairwise
judge's prompt (AlpacaEval 2.0's `alpaca_eval_clf_gpt4_turbo`, Apache-2.0, tatsu-lab/alpaca_eval)."""
