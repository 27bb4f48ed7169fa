"""Training speed against the tutorial's loop; the same as `mnist-vae bench`.

python benchmarks/train_speed.py [--out reports/bench.json] [--device cpu] [--no-mlflow]
"""

from mnist_vae.cli import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]], prog_name="train_speed.py")
