"""embeddings: dataset-statistics features of every task and similarity matrices over some meta-test tasks."""
from __future__ import annotations

from pathlib import Path

from components.families import TaskFamily, Tables
from components.features import SIMILARITIES, pairwise_similarity
from flows import report
from flows.cache import write_table


def build_embeddings(family: TaskFamily, tables: Tables, metrics: tuple[str, ...], n_similarity_tasks: int,
                     out: Path) -> dict:
    features = family.features(tables)
    write_table(features.reset_index(), out, "features")
    test = features[features["split"] == "meta_test"].drop(columns="split").head(n_similarity_tasks)
    for metric in metrics:
        matrix = pairwise_similarity(test, metric)
        write_table(matrix.rename(columns=str).reset_index(names="task_id"), out, f"similarity_{metric}")
        kind = "similarity" if metric in SIMILARITIES else "distance"  # the file keeps its name either way
        report.plot_heatmap(matrix, f"the first {len(test)} meta-test tasks: {metric} {kind}",
                            out / f"similarity_{metric}.png", f"{metric} {kind}", distance=kind == "distance")
    # fewer meta-test tasks than n_similarity_tasks: the matrices hold them all (recorded, said in the title)
    return {"n_features": features.shape[1] - 1, "n_tasks": features.shape[0], "n_similarity_tasks": len(test)}
