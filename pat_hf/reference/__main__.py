"""`python -m pat_hf.reference CKPT --distiller NAME`: convert a reference checkpoint (pat_hf/reference/convert.py)."""

from pat_hf.reference.convert import main

if __name__ == "__main__":
    main()
