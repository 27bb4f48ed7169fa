"""DVC stage `download`: see mnist_vae.stages.download for what it reads and writes."""

from mnist_vae.stages.download import main

if __name__ == "__main__":
    main()
