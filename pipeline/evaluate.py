"""DVC stage `evaluate`: see mnist_vae.stages.evaluate for what it reads and writes."""

from mnist_vae.stages.evaluate import main

if __name__ == "__main__":
    main()
