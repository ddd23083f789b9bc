"""Architecture families over the IR (llama, bert, cnn: canonical weight names, graphs); reference models in recipes/."""
