"""Scaling-law tooling for value-residual models: plan an IsoFLOP sweep, collect its runs, fit
Chinchilla's laws, compare two families at equal loss, and plot (attention concentration: rf_megatron/analysis/).

One idea per module:

- `accounting`: parameters (embedding / non-embedding) and training FLOPs per token of a model
  (thin layer over `rf_megatron.flops`, plus the 6N shortcuts);
- `family`: a model family = a variant plus a width/depth rule, so "size" is one integer (depth);
- `plan`: the IsoFLOP grid (budgets x sizes -> tokens, steps, batch, LR) as a sweep file;
- `sweep`: the sweep-file format (one `PRESET key=value ...` line per run) and "is this run done";
- `collect`: runs' `config.yaml` + `metrics.jsonl` -> one table;
- `fit`: Chinchilla approach 3, L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap CIs;
- `isoflop`: Chinchilla approach 2, parabolas per budget and N_opt / D_opt power laws;
- `compare`: parameter / data / compute saving of family a over family b at equal loss;
- `plots`: PNG figures (matplotlib, Agg).
"""
