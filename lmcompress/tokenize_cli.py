"""tokenize_datasets.py: raw text (local files or a hub dataset) → optional cleaning → a token folder."""
from .cleaning import CleaningOptions
from .cli import ArgumentParser
from .errors import UserError, entry_point
from .tokenization import TextSources, tokenize_to_folder
from .vocab import load_backend_tokenizer


def parse_args(argv=None):
    parser = ArgumentParser(prog="tokenize_datasets.py", description=__doc__)
    parser.add_argument("--tokenizer_name_or_path", required=True, help="tokenizer folder or hub name")
    parser.add_argument("--train_file", nargs="+", default=[], help="text file(s) for the train split")
    parser.add_argument("--validation_file", nargs="+", default=[], help="text file(s) for the validation split")
    parser.add_argument("--test_file", nargs="+", default=[], help="text file(s) for the test split")
    parser.add_argument("--dataset_name", help="hub dataset, e.g. wikitext or openwebtext")
    parser.add_argument("--dataset_config_name", help="hub dataset configuration, e.g. wikitext-103-raw-v1")
    parser.add_argument("--validation_split_percentage", type=float, default=5.0,
                        help="percent of the train text used as validation when no validation data is given")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_proc", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--clean", action="store_true", help="drop duplicate, HTML, short and non-alphabetic lines")
    parser.add_argument("--min_line_length", type=int, default=CleaningOptions.min_line_length)
    parser.add_argument("--max_nonalpha_fraction", type=float, default=CleaningOptions.max_nonalpha_fraction)
    parser.add_argument("--overwrite", action="store_true", help="redo the job even when the output is up to date")
    args = parser.parse_args(argv)
    if args.dataset_name and (args.train_file or args.validation_file or args.test_file):
        parser.error("give either --dataset_name or text files, not both")
    if not 0 <= args.validation_split_percentage < 100:
        parser.error("--validation_split_percentage must be in [0, 100)")
    if args.num_proc < 1:
        parser.error("--num_proc must be at least 1")
    return args


def sources_from_args(args):
    files = {split: paths for split, paths in
             (("train", args.train_file), ("validation", args.validation_file), ("test", args.test_file)) if paths}
    return TextSources(files=files, dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                       validation_split_percentage=args.validation_split_percentage, clean=args.clean,
                       cleaning=CleaningOptions(args.min_line_length, args.max_nonalpha_fraction))


@entry_point
def main(argv=None):
    args = parse_args(argv)
    sources = sources_from_args(args)
    if not sources.files and not sources.dataset_name:
        raise UserError("no data: give --train_file (and optionally --validation_file/--test_file) or --dataset_name")
    tokenizer = load_backend_tokenizer(args.tokenizer_name_or_path, "--tokenizer_name_or_path")
    meta = tokenize_to_folder(sources, tokenizer, args.tokenizer_name_or_path, args.output_dir,
                              num_proc=args.num_proc, overwrite=args.overwrite)
    for split, counts in meta["splits"].items():
        print(f"{split}: {counts['n_tokens']:,} tokens, {counts['n_documents']:,} documents")
    cleaning = meta["cleaning"]
    if cleaning["counts"]:
        dropped = {reason: n for reason, n in cleaning["counts"].items() if reason != "kept" and n}
        print(f"cleaning: kept {cleaning['counts']['kept']:,} lines, dropped {dropped or 'none'}")
    print(f"wrote {args.output_dir}")
