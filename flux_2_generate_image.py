from musubi_tuner.flux_2_generate_image import main

if __name__ == "__main__":
    main()
