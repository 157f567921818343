"""The main job. Until the ablation scripts land, it runs the Split-MNIST demo (see ``ablations.demo``)."""

from ablations.demo import main

if __name__ == "__main__":
    main()
