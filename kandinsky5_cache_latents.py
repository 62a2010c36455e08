from musubi_tuner.kandinsky5_cache_latents import main

if __name__ == "__main__":
    main()
