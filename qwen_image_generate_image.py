from musubi_tuner.qwen_image_generate_image import main

if __name__ == "__main__":
    main()
