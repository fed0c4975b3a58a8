/* streamrig: a native fake upstream and stream client for bench/streams.py --rig native.
 *
 * The Python fake and client of bench/streams.py share one core and top out at about
 * 20,000 chunks/s: 500 streams with 5 ms between chunks ask for 100,000. This program
 * produces and reads that rate with one epoll loop per process, so what is measured is
 * the proxy in between, not the rig.
 *
 *   streamrig fake PORT
 *       An OpenAI-shaped upstream on 127.0.0.1:PORT. GET answers 200 "ok". A POST whose
 *       body has "stream": true answers a chat.completion.chunk SSE stream (chunked):
 *       X-Fake-Chunks content deltas (default 40), X-Fake-Chunk-Delay-Ms apart (default
 *       5), each scheduled at start + k * delay (a late tick is not made up by skipping)
 *       and, with X-Bench-Stamp: 1, carrying "x_bench_sent_ns":<CLOCK_MONOTONIC ns> taken
 *       just before its write; then a usage chunk and [DONE]. Other POSTs answer one
 *       chat.completion with usage. Keep-alive throughout.
 *
 *   streamrig client PORT PATH KEY
 *       Reads commands on stdin, one per line:
 *           round N CHUNKS DELAY_MS TIMEOUT_S OUTFILE
 *       opens (or reuses) N keep-alive connections to 127.0.0.1:PORT, sends one streamed
 *       chat request (stamped) on each at once, reads every stream to its end, writes one
 *       line per stream to OUTFILE ("S index status start_ns done usage n" followed by n
 *       lines "sent_ns recv_ns"), and prints "ok" on stdout. A stream still open after
 *       TIMEOUT_S seconds is dropped and reported as failed. The receive time of a chunk
 *       is the time of the read() that completed its SSE event.
 *
 * Loopback only; stops when stdin closes (client) or on SIGTERM (fake).
 * Build: cc -O2 -o streamrig bench/streamrig.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXCONN 4096
#define INBUF 65536

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Write all of buf on a non-blocking socket; returns -1 when the peer is gone. The rig's
 * writes are small and its peers always read, so a full send buffer (EAGAIN) is waited
 * out in 50 µs sleeps that hold up the whole loop: simple, and never seen in a run. */
static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct timespec ts = {0, 50000};
                nanosleep(&ts, NULL);
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Case-insensitive header lookup in a request/response head; returns the value's start
 * or NULL. */
static const char *header(const char *head, size_t len, const char *name) {
    size_t nl = strlen(name);
    const char *p = head, *end = head + len;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol) break;
        if ((size_t)(eol - p) > nl + 1 && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ') v++;
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

/* ------------------------------------------------------------------------ the fake */
struct fconn {
    int fd;
    char in[INBUF];
    size_t inlen;
    int streaming, stamp;
    int chunks, sent;
    int64_t start, delay;
};

static struct fconn *fconns[MAXCONN];

static void fake_close(int ep, struct fconn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    fconns[c->fd] = NULL;
    free(c);
}

static int chunk_write(int fd, const char *data, size_t len, const char *tail) {
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "%zx\r\n%.*s\r\n%s", len, (int)len, data, tail);
    return write_all(fd, buf, (size_t)n);
}

static const char PREFIX[] =
    "data: {\"id\":\"chatcmpl-rig\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
    "\"model\":\"gpt-4o-mini\",\"system_fingerprint\":null,\"choices\":[";

/* Send content delta k of stream c (and the end of the stream after the last). */
static int fake_send_delta(struct fconn *c) {
    char ev[1024];
    int n;
    if (c->stamp)
        n = snprintf(ev, sizeof ev,
                     "%s{\"index\":0,\"delta\":{\"content\":\"word \"},\"finish_reason\":null}],"
                     "\"x_bench_sent_ns\":%lld}\n\n",
                     PREFIX, (long long)now_ns());
    else
        n = snprintf(ev, sizeof ev,
                     "%s{\"index\":0,\"delta\":{\"content\":\"word \"},\"finish_reason\":null}]}\n\n",
                     PREFIX);
    if (chunk_write(c->fd, ev, (size_t)n, "") < 0) return -1;
    c->sent++;
    if (c->sent < c->chunks) return 0;
    char end[2048];
    n = snprintf(end, sizeof end,
                 "%s{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
                 "%s],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":%d,"
                 "\"total_tokens\":%d}}\n\ndata: [DONE]\n\n",
                 PREFIX, PREFIX, c->chunks, 14 + c->chunks);
    c->streaming = 0;
    return chunk_write(c->fd, end, (size_t)n, "0\r\n\r\n");
}

static const char CHAT[] =
    "{\"id\":\"chatcmpl-rig\",\"object\":\"chat.completion\",\"created\":1700000000,"
    "\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello there.\"},\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":3,\"total_tokens\":17}}";

/* A whole request is in c->in: answer it (or start its stream); returns bytes used,
 * 0 when incomplete, -1 on error. */
static int fake_request(struct fconn *c) {
    char *hend = memmem(c->in, c->inlen, "\r\n\r\n", 4);
    if (!hend) return c->inlen >= INBUF ? -1 : 0;
    size_t hlen = (size_t)(hend - c->in) + 4;
    const char *cl = header(c->in, hlen, "content-length");
    size_t blen = cl ? strtoul(cl, NULL, 10) : 0;
    if (hlen + blen > INBUF) return -1;
    if (c->inlen < hlen + blen) return 0;
    const char *body = c->in + hlen;
    char out[4096];
    int n;
    if (strncmp(c->in, "GET ", 4) == 0) {
        n = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok");
        if (write_all(c->fd, out, (size_t)n) < 0) return -1;
    } else if (memmem(body, blen, "\"stream\": true", 14) || memmem(body, blen, "\"stream\":true", 13)) {
        const char *v;
        c->chunks = (v = header(c->in, hlen, "x-fake-chunks")) ? atoi(v) : 40;
        c->delay = ((v = header(c->in, hlen, "x-fake-chunk-delay-ms")) ? atoi(v) : 5) * 1000000LL;
        c->stamp = (v = header(c->in, hlen, "x-bench-stamp")) && *v == '1';
        if (c->chunks < 1) c->chunks = 1;
        n = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                     "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n");
        if (write_all(c->fd, out, (size_t)n) < 0) return -1;
        c->streaming = 1;
        c->sent = 0;
        c->start = now_ns();
        if (fake_send_delta(c) < 0) return -1; /* the first delta at once */
    } else {
        n = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(CHAT), CHAT);
        if (write_all(c->fd, out, (size_t)n) < 0) return -1;
    }
    return (int)(hlen + blen);
}

static int fake_main(int port) {
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    nonblock(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("streamrig fake listening on 127.0.0.1:%d\n", port);
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        /* the earliest due delta decides how long to wait */
        int64_t t = now_ns(), due = INT64_MAX;
        for (int fd = 0; fd < MAXCONN; fd++) {
            struct fconn *c = fconns[fd];
            if (c && c->streaming) {
                int64_t d = c->start + (int64_t)c->sent * c->delay;
                if (d <= t) {
                    if (fake_send_delta(c) < 0) {
                        fake_close(ep, c);
                        continue;
                    }
                    if (!c->streaming) continue;
                    d = c->start + (int64_t)c->sent * c->delay;
                }
                if (d < due) due = d;
            }
        }
        struct timespec wait, *wp = NULL;
        if (due != INT64_MAX) {
            int64_t w = due - now_ns();
            if (w < 0) w = 0;
            wait.tv_sec = w / 1000000000LL;
            wait.tv_nsec = w % 1000000000LL;
            wp = &wait;
        }
        int n = epoll_pwait2(ep, evs, 256, wp, NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int cfd;
                while ((cfd = accept(ls, NULL, NULL)) >= 0) {
                    if (cfd >= MAXCONN) {
                        close(cfd);
                        continue;
                    }
                    nonblock(cfd);
                    struct fconn *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    fconns[cfd] = c;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ce);
                }
                continue;
            }
            struct fconn *c = fconns[fd];
            if (!c) continue;
            ssize_t r = read(fd, c->in + c->inlen, INBUF - c->inlen);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                fake_close(ep, c);
                continue;
            }
            c->inlen += (size_t)r;
            while (!c->streaming && c->inlen > 0) {
                int used = fake_request(c);
                if (used < 0) {
                    fake_close(ep, c);
                    c = NULL;
                    break;
                }
                if (used == 0) break;
                memmove(c->in, c->in + used, c->inlen - (size_t)used);
                c->inlen -= (size_t)used;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------- the client */
#define MAXCHUNKS 4096

struct cconn {
    int fd, index, active, connected;
    int status, done, usage, failed;
    int64_t start;
    /* response parsing */
    char head[8192];
    size_t headlen;
    int in_body, chunked;
    long remaining; /* bytes left in the current chunk, or of a Content-Length body */
    int chunk_state; /* 0: size line, 1: data, 2: CRLF after data */
    char sizeline[32];
    size_t sizelen;
    char sse[INBUF];
    size_t sselen;
    int n;
    int64_t sent[MAXCHUNKS], recv[MAXCHUNKS];
};

static struct cconn *cconns[MAXCONN];
static int c_port;
static const char *c_path, *c_key;

static int client_connect(int ep, struct cconn *c) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || fd >= MAXCONN) die("socket");
    nonblock(fd);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) die("connect");
    c->fd = fd;
    c->connected = 0;
    cconns[fd] = c;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

static void client_drop(int ep, struct cconn *c) {
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        cconns[c->fd] = NULL;
    }
    c->fd = -1;
    c->connected = 0;
}

static int chunks_arg, delay_arg;

static int client_send(struct cconn *c) {
    char body[512], req[2048];
    int bl = snprintf(body, sizeof body,
                      "{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": "
                      "\"Tell me a story, number %d.\"}], \"max_tokens\": 512, \"stream\": true, "
                      "\"stream_options\": {\"include_usage\": true}}",
                      c->index);
    int n = snprintf(req, sizeof req,
                     "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                     "Authorization: Bearer %s\r\nX-Fake-Chunks: %d\r\nX-Fake-Output: %d\r\n"
                     "X-Fake-Chunk-Delay-Ms: %d\r\nX-Bench-Stamp: 1\r\nContent-Length: %d\r\n\r\n%s",
                     c_path, c_port, c_key, chunks_arg, chunks_arg, delay_arg, bl, body);
    c->start = now_ns();
    return write_all(c->fd, req, (size_t)n);
}

/* Complete SSE events in c->sse: record their stamps (received at t). */
static void client_events(struct cconn *c, int64_t t) {
    char *end = NULL;
    for (char *p = c->sse; (p = memmem(p, c->sselen - (size_t)(p - c->sse), "\n\n", 2)); p += 2)
        end = p + 2;
    if (!end) return;
    size_t len = (size_t)(end - c->sse);
    const char *key = "\"x_bench_sent_ns\":";
    for (char *p = c->sse; (p = memmem(p, len - (size_t)(p - c->sse), key, 18)); p += 18) {
        if (c->n < MAXCHUNKS) {
            c->sent[c->n] = strtoll(p + 18, NULL, 10);
            c->recv[c->n] = t;
            c->n++;
        }
    }
    if (memmem(c->sse, len, "\"usage\":{", 9)) c->usage = 1;
    if (memmem(c->sse, len, "data: [DONE]", 12)) c->done = 1;
    memmove(c->sse, end, c->sselen - len);
    c->sselen -= len;
}

static void body_bytes(struct cconn *c, const char *p, size_t n) {
    if (c->sselen + n > INBUF) { /* an event that large is not ours: drop it */
        c->sselen = 0;
        return;
    }
    memcpy(c->sse + c->sselen, p, n);
    c->sselen += n;
}

/* Feed bytes from the socket; returns 1 when the response is complete. */
static int client_feed(struct cconn *c, const char *p, size_t n, int64_t t) {
    while (n > 0) {
        if (!c->in_body) {
            size_t take = n < sizeof c->head - c->headlen ? n : sizeof c->head - c->headlen;
            memcpy(c->head + c->headlen, p, take);
            char *he = memmem(c->head, c->headlen + take, "\r\n\r\n", 4);
            if (!he) {
                c->headlen += take;
                if (c->headlen >= sizeof c->head) return c->failed = 1;
                return 0;
            }
            size_t used = (size_t)(he - c->head) + 4 - c->headlen;
            c->headlen = (size_t)(he - c->head) + 4;
            p += used;
            n -= used;
            c->status = atoi(c->head + 9);
            const char *te = header(c->head, c->headlen, "transfer-encoding");
            c->chunked = te && strncasecmp(te, "chunked", 7) == 0;
            const char *cl = header(c->head, c->headlen, "content-length");
            c->remaining = cl ? atol(cl) : -1;
            c->in_body = 1;
            c->chunk_state = 0;
            c->sizelen = 0;
            if (!c->chunked && c->remaining == 0) return 1;
            continue;
        }
        if (!c->chunked) {
            size_t take = c->remaining >= 0 && (size_t)c->remaining < n ? (size_t)c->remaining : n;
            body_bytes(c, p, take);
            p += take;
            n -= take;
            if (c->remaining >= 0) {
                c->remaining -= (long)take;
                if (c->remaining == 0) {
                    client_events(c, t);
                    return 1;
                }
            }
            continue;
        }
        if (c->chunk_state == 0) { /* size line */
            while (n > 0 && c->chunk_state == 0) {
                char ch = *p++;
                n--;
                if (ch == '\n') {
                    c->sizeline[c->sizelen] = 0;
                    c->remaining = strtol(c->sizeline, NULL, 16);
                    c->sizelen = 0;
                    c->chunk_state = c->remaining == 0 ? 3 : 1;
                } else if (c->sizelen < sizeof c->sizeline - 1) {
                    c->sizeline[c->sizelen++] = ch;
                }
            }
        } else if (c->chunk_state == 1) {
            size_t take = (size_t)c->remaining < n ? (size_t)c->remaining : n;
            body_bytes(c, p, take);
            p += take;
            n -= take;
            c->remaining -= (long)take;
            if (c->remaining == 0) c->chunk_state = 2;
        } else if (c->chunk_state == 2) { /* CRLF after the data */
            while (n > 0 && c->chunk_state == 2) {
                char ch = *p++;
                n--;
                if (ch == '\n') c->chunk_state = 0;
            }
        } else { /* after the last chunk: the final CRLF (no trailers expected) */
            while (n > 0) {
                char ch = *p++;
                n--;
                if (ch == '\n') {
                    client_events(c, t);
                    return 1;
                }
            }
        }
    }
    client_events(c, t);
    return 0;
}

static void client_reset(struct cconn *c) {
    c->status = c->done = c->usage = c->failed = 0;
    c->headlen = c->sselen = c->sizelen = 0;
    c->in_body = c->chunked = c->chunk_state = 0;
    c->n = 0;
    c->active = 1;
}

static int client_round(int ep, struct cconn **pool, int *npool, int streams, int timeout_s,
                        const char *out) {
    while (*npool < streams) {
        struct cconn *c = calloc(1, sizeof *c);
        c->fd = -1;
        pool[(*npool)++] = c;
    }
    int pending = streams;
    for (int i = 0; i < streams; i++) {
        struct cconn *c = pool[i];
        c->index = i;
        client_reset(c);
        if (c->fd < 0) {
            client_connect(ep, c); /* the request goes once connected */
        } else if (client_send(c) < 0) {
            client_drop(ep, c);
            c->failed = 1, c->active = 0, pending--;
        }
    }
    int64_t deadline = now_ns() + (int64_t)timeout_s * 1000000000LL;
    struct epoll_event evs[256];
    static char buf[262144];
    while (pending > 0 && now_ns() < deadline) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (!c->connected && (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) {
                    client_drop(ep, c);
                    if (c->active) c->failed = 1, c->active = 0, pending--;
                    continue;
                }
                c->connected = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                if (c->active && client_send(c) < 0) {
                    client_drop(ep, c);
                    c->failed = 1, c->active = 0, pending--;
                }
                continue;
            }
            if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            ssize_t r = read(c->fd, buf, sizeof buf);
            int64_t t = now_ns();
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                int was = c->active;
                if (c->active && c->in_body && !c->chunked && c->remaining < 0)
                    client_events(c, t); /* a close-delimited body ends here */
                else if (c->active)
                    c->failed = 1;
                client_drop(ep, c);
                if (was) c->active = 0, pending--;
                continue;
            }
            if (!c->active) continue; /* bytes after the end of a response: not ours */
            if (client_feed(c, buf, (size_t)r, t) || c->failed) {
                c->active = 0;
                pending--;
                if (c->failed) client_drop(ep, c);
            }
        }
    }
    FILE *f = fopen(out, "w");
    if (!f) die(out);
    for (int i = 0; i < streams; i++) {
        struct cconn *c = pool[i];
        if (c->active) { /* timed out */
            client_drop(ep, c);
            c->active = 0;
            c->failed = 1;
        }
        fprintf(f, "S %d %d %lld %d %d %d\n", i, c->failed && !c->status ? -1 : c->status,
                (long long)c->start, c->done, c->usage, c->n);
        for (int k = 0; k < c->n; k++) fprintf(f, "%lld %lld\n", (long long)c->sent[k], (long long)c->recv[k]);
    }
    fclose(f);
    return 0;
}

static int client_main(int port, const char *path, const char *key) {
    signal(SIGPIPE, SIG_IGN);
    c_port = port, c_path = path, c_key = key;
    int ep = epoll_create1(0);
    static struct cconn *pool[MAXCONN];
    int npool = 0;
    char line[1024];
    while (fgets(line, sizeof line, stdin)) {
        int streams, chunks, delay, timeout_s;
        char out[900];
        if (sscanf(line, "round %d %d %d %d %899s", &streams, &chunks, &delay, &timeout_s, out) != 5 ||
            streams < 1 || streams > MAXCONN / 2 || chunks < 1 || chunks >= MAXCHUNKS || timeout_s < 1) {
            printf("error: bad command\n");
            fflush(stdout);
            continue;
        }
        chunks_arg = chunks, delay_arg = delay;
        client_round(ep, pool, &npool, streams, timeout_s, out);
        printf("ok\n");
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "fake") == 0) return fake_main(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "client") == 0)
        return client_main(atoi(argv[2]), argv[3], argv[4]);
    fprintf(stderr, "usage: streamrig fake PORT | streamrig client PORT PATH KEY\n");
    return 2;
}
