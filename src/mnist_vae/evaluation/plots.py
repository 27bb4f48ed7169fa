"""The page template of ``dvc plots show`` and ``dvc plots diff``, with Vega bundled: works offline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so with no internet its loss curves
are a blank page. ``.dvc/config`` points ``plots.html_template`` at the file written here instead,
which carries the three libraries inline, bundled by vl-convert-python (a package that ships them).
The page has no ``{scripts}`` placeholder, so DVC has nowhere to add its CDN tags. ``make install``
writes it; ``python -m mnist_vae.evaluation.plots`` writes it again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_vae.atomic import atomic_write

# Relative to the project root; .dvc/config names it relative to .dvc, as DVC expects.
TEMPLATE = Path(".dvc/plots/offline.html")
# DVC's plots declare Vega-Lite 5 ($schema .../vega-lite/v5.json): bundle the newest 5.x.
VEGA_LITE_VERSION = "5.21"
# The placeholders DVC fills by plain text replacement.
_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>mnist-vae plots</title>
    <script>
/* Vega, Vega-Lite __VL__ and Vega-Embed, bundled by vl-convert-python for use without internet. */
__BUNDLE__
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template's text: DVC's placeholders around the inlined JavaScript bundle."""
    import vl_convert

    # The stub marks ``snippet`` required; left out, the bundle defines the documented globals.
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)  # type: ignore[call-arg]
    # The bundle must neither end the <script> element early nor hold a DVC placeholder that the
    # page's text replacement would rewrite: both would break the page silently.
    bundle = bundle.replace("</script", "<\\/script")
    clash = [p for p in _PLACEHOLDERS if p in bundle]
    if clash:
        raise RuntimeError(f"vl-convert's Vega bundle contains DVC's placeholders {clash}")
    return _PAGE.replace("__VL__", VEGA_LITE_VERSION).replace("__BUNDLE__", bundle)


def write_template(root: Path = Path(".")) -> Path:
    """Writes the template under ``root`` (atomically) and returns its path."""
    path = Path(root) / TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project root")
    print(f"wrote {write_template(parser.parse_args(argv).root)}")


if __name__ == "__main__":
    main()
