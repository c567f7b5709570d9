"""Interaction data as numpy arrays (imports no model code).

store       InteractionStore: CSR user offsets + item ids (+ timestamps), vocabularies, item columns
readers     read_interactions(path, format) for pairs / sequences / ratings / MovieLens / RecBole / LLaRA files
detect      format="auto": the one format a file clearly is, or a one-line error (never a guess)
llara       read_llara(dir) -> {"train", "valid", "test"} stores sharing one item vocabulary
splits      leave_one_out, gap_split (CaseQ), temporal_split -> Split of EvalExamples
windows     TrainWindows / EvalRecords (Grain record sources), popularity_counts
stats       describe / format_stats (`jaxrec data stats`)
synthetic   make_synthetic(SyntheticConfig): the embedded data set; synthetic_reference: its oracles
See docs/data.md.
"""
