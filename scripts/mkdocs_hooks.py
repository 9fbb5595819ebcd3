"""mkdocs hooks (mkdocs.yml ``hooks:``): publish the benchmark result files the benchmarks page links to.

``docs/benchmarks.md`` includes ``benchmarks/README.md``, whose links point at ``results/<file>.txt`` beside it;
this hook adds those files to the site at ``results/`` so the links work there too, and mkdocs' strict link
check can see them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((ROOT / "benchmarks" / "results").glob("*")):
        if path.is_file():
            files.append(
                File(
                    f"results/{path.name}",
                    src_dir=str(ROOT / "benchmarks"),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
