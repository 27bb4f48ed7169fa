"""DVC stage `train`: see mnist_vae.stages.train for what it reads and writes."""

from mnist_vae.stages.train import main

if __name__ == "__main__":
    main()
