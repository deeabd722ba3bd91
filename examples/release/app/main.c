/* release-demo app: prints a greeting built by libgreet (the fetched dependency). */
#include <stdio.h>
#include "greet.h"

int main(int argc, char **argv)
{
    char line[256];
    const char *name = argc > 1 ? argv[1] : "kiln";
    if (greet(line, sizeof line, "hello", name) >= (int)sizeof line) {
        fprintf(stderr, "name too long\n");
        return 1;
    }
    puts(line);
    return 0;
}
