"""Publish a TransFER release folder to a Hugging Face Hub model repo.

    python scripts/publish_release.py releases/transfer_tiny.ferplus transfer-timm/transfer_tiny.ferplus
    python scripts/publish_release.py --dry-run releases/transfer_tiny.ferplus transfer-timm/transfer_tiny.ferplus
"""
import argparse
import logging
import os
import sys

from huggingface_hub.errors import HfHubHTTPError

from transfer_timm.hub import (
    MAX_MODEL_BYTES, OPTIONAL_FILES, REQUIRED_FILES, ReleaseError, check_repo_id, publish_release, validate_release,
)

_logger = logging.getLogger('publish_release')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            f'Validate a release folder and upload it to a Hugging Face Hub model repo as one commit. '
            f'The folder must contain {", ".join(REQUIRED_FILES)} and may contain {", ".join(OPTIONAL_FILES)}; '
            f'timm must load it with local-dir:. The repo is created if it does not exist.'
        ),
    )
    parser.add_argument('folder', help='Release folder, for example releases/transfer_tiny.ferplus.')
    parser.add_argument('repo_id', help='Hub model repo id in the form ORG/NAME.')
    parser.add_argument(
        '--token', default=None,
        help='Hub access token with write access. Default: the HF_TOKEN environment variable, '
             'else the token saved by "hf auth login".',
    )
    parser.add_argument('--private', action='store_true',
                        help='Create the repo as private. Has no effect on a repo that already exists.')
    parser.add_argument('--commit-message', default='Upload TransFER release', help='Message of the upload commit.')
    parser.add_argument('--max-model-mb', type=float, default=MAX_MODEL_BYTES / 10**6,
                        help='Largest accepted model.safetensors, in MB (10**6 bytes). Default: %(default)s.')
    parser.add_argument('--dry-run', action='store_true',
                        help='Only validate the folder and the repo id; upload nothing and contact no server.')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    max_model_bytes = int(args.max_model_mb * 10**6)
    try:
        if args.dry_run:
            check_repo_id(args.repo_id)
            files = validate_release(args.folder, max_model_bytes=max_model_bytes)
            _logger.info('Dry run: %s is a valid release (%s); nothing was uploaded to %s.',
                         args.folder, ', '.join(files), args.repo_id)
            return 0
        token = args.token or os.environ.get('HF_TOKEN')
        commit = publish_release(
            args.folder, args.repo_id, token=token, private=args.private, commit_message=args.commit_message,
            max_model_bytes=max_model_bytes,
        )
    except (ReleaseError, ValueError) as e:
        _logger.error('%s', e)
        return 1
    except HfHubHTTPError as e:
        _logger.error('Upload of %s to %s failed: %s', args.folder, args.repo_id, e)
        return 1
    _logger.info('Published %s to %s: %s', args.folder, args.repo_id, getattr(commit, 'commit_url', commit))
    return 0


if __name__ == '__main__':
    sys.exit(main())
